"""What is particular to Qwen2-MoE (legacy/qwen2_moe.py): where the experts are, the gated
shared expert, the config mapping. Logits, greedy decoding, KV cache and save_pretrained run
against transformers' Qwen2MoeForCausalLM in tests/models/test_hf_parity.py (fixture
tests/fixtures/hf/qwen2_moe: 3 layers, layer 1 dense, shared expert of 48, top-2 of 4
renormalised)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from legacy import qwen2_moe  # noqa: E402
from models.safetensors_io import read_checkpoint  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "qwen2_moe"
CONFIG = {"model_type": "qwen2_moe", "num_hidden_layers": 4, "hidden_size": 64,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
          "moe_intermediate_size": 32, "shared_expert_intermediate_size": 80, "num_experts": 8,
          "num_experts_per_tok": 2, "decoder_sparse_step": 2, "vocab_size": 256}


def test_experts_shared_expert_and_gate_load_where_the_checkpoint_has_them():
    model = models.from_pretrained(FIXTURE)
    assert list(model.moe_layers) == [0, 2]
    params = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    ckpt = read_checkpoint(FIXTURE)
    gate = ckpt["model.layers.2.mlp.shared_expert_gate.weight"].load()  # [1, h]
    np.testing.assert_array_equal(params["decoder.layers.2.mlp.shared_gate"], gate.T)
    assert params["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"].shape == (2 * 48, 64)
    assert params["decoder.layers.1.mlp.linear_fc1.weight"].shape == (2 * 128, 64)
    assert params["decoder.layers.0.self_attention.linear_qkv.bias"].shape == ((4 + 2 * 2) * 16,)


def test_config_mapping_and_errors():
    cfg = qwen2_moe.config_from_hf(CONFIG)
    moe = cfg.moe
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert (moe.num_experts, moe.top_k, moe.ffn_hidden_size) == (8, 2, 32)
    assert (moe.shared_ffn_hidden_size, moe.shared_expert_gate) == (80, True)
    assert (moe.pre_softmax, moe.normalize_topk, moe.aux_loss_coeff) == (True, False, 0.0)
    assert cfg.attention.qkv_bias and not cfg.attention.out_bias
    assert not qwen2_moe.config_from_hf({**CONFIG, "qkv_bias": False}).attention.qkv_bias
    dense = qwen2_moe.config_from_hf({**CONFIG, "mlp_only_layers": [1, 3]})
    assert dense.moe.num_experts == 0
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        qwen2_moe.config_from_hf({**CONFIG, "use_sliding_window": True})
    with pytest.raises(ValueError, match="decoder_sparse_step=0"):
        qwen2_moe.config_from_hf({**CONFIG, "decoder_sparse_step": 0})
