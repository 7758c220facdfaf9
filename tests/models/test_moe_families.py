"""What is particular to the Mixtral and Qwen3-MoE families: which layers hold experts, the
load-balancing loss against transformers', the config mapping and the weight tables (logits,
greedy decoding, KV cache and save_pretrained run for them in test_hf_parity.py).

Fixtures (tests/fixtures/hf/mixtral, .../qwen3_moe) were written once by
tests/make_hf_fixtures.py: 4 experts, top-2, per-expert tensor names; qwen3_moe keeps layer 0
dense and does not renormalise its top-k weights. qwen3_moe has one MoE layer, so transformers'
pooled loss is the layer's loss: ours equals its ``router_aux_loss_coef * aux_loss``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from models import mixtral, qwen3_moe  # noqa: E402
from models.safetensors_io import read_checkpoint  # noqa: E402
from models.weights import to_hf, to_local  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
FAMILIES = ["mixtral", "qwen3_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_layers_are_where_the_checkpoint_has_experts(family):
    model = models.from_pretrained(FIXTURES / family)
    assert list(model.moe_layers) == ([0, 1] if family == "mixtral" else [1])
    params = dict(model.parameters_and_names())
    ffn = 64 if family == "mixtral" else 32
    assert params["decoder.layers.1.mlp.experts.fc1"].shape == (4, 64, 2 * ffn)
    if family == "qwen3_moe":  # layer 0 is dense
        assert params["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 128, 64)


def test_qwen3_moe_load_balancing_loss_matches_transformers():
    ref = np.load(FIXTURES / "qwen3_moe" / "reference.npz")
    model = models.from_pretrained(FIXTURES / "qwen3_moe", output_router_logits=True)
    ids = ref["input_ids"]
    labels = ms.Tensor(np.roll(ids, -1, 1))
    _, _, aux, counts = model.loss_with_aux(ms.Tensor(ids), labels)
    coef = model.hf.config["router_aux_loss_coef"]
    assert aux.shape == (1, 3)  # one MoE layer; columns mcore.moe.AUX_LOSS_NAMES
    np.testing.assert_allclose(float(aux.asnumpy()[0, 0]), coef * float(ref["aux_loss"]),
                               rtol=1e-5)
    assert int(counts.asnumpy().sum()) == ids.size * 2  # every token reaches top_k = 2 experts


def test_no_aux_loss_unless_output_router_logits():
    model = models.from_pretrained(FIXTURES / "mixtral")
    assert model.config.moe.aux_loss_coeff == 0.0


# ---- config mapping and weight tables (no model forward) ----

MIXTRAL = {"model_type": "mixtral", "num_hidden_layers": 3, "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
           "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 256,
           "output_router_logits": True, "router_aux_loss_coef": 0.02}


def test_mixtral_config_mapping():
    cfg = mixtral.config_from_hf(MIXTRAL)
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.ffn_hidden_size) == (8, 2, 48)
    assert (moe.score_function, moe.pre_softmax, moe.normalize_topk) == ("softmax", False, False)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, True, True]
    assert moe.aux_loss_coeff == pytest.approx(0.02 * 2 / 3)  # HF's loss is top_k x, pooled
    with pytest.raises(ValueError, match=r"router_jitter_noise=0\.1: router jitter"):
        mixtral.config_from_hf({**MIXTRAL, "router_jitter_noise": 0.1})
    with pytest.raises(ValueError, match=r"sliding_window=4096: sliding-window"):
        mixtral.config_from_hf({**MIXTRAL, "sliding_window": 4096})


QWEN3_MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 6, "hidden_size": 64,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "intermediate_size": 96, "moe_intermediate_size": 24, "num_experts": 8,
             "num_experts_per_tok": 4, "norm_topk_prob": True, "decoder_sparse_step": 2,
             "mlp_only_layers": [3], "vocab_size": 256}


def test_qwen3_moe_config_mapping():
    cfg = qwen3_moe.config_from_hf(QWEN3_MOE)
    moe = cfg.moe
    # (i + 1) % 2 == 0 -> 1, 3, 5; 3 is listed in mlp_only_layers
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == [1, 5]
    assert (moe.num_experts, moe.top_k, moe.ffn_hidden_size) == (8, 4, 24)
    assert (moe.pre_softmax, moe.normalize_topk, moe.aux_loss_coeff) == (True, True, 0.0)
    assert cfg.ffn_hidden_size == 96 and cfg.attention.qk_norm
    renamed = {k: v for k, v in QWEN3_MOE.items() if k != "num_experts"}
    assert qwen3_moe.config_from_hf({**renamed, "num_local_experts": 8}).moe.num_experts == 8
    dense = qwen3_moe.config_from_hf({**QWEN3_MOE, "mlp_only_layers": [1, 3, 5]})
    assert dense.moe.num_experts == 0
    with pytest.raises(ValueError, match=r"decoder_sparse_step=0: must be an integer >= 1"):
        qwen3_moe.config_from_hf({**QWEN3_MOE, "decoder_sparse_step": 0})


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_table_round_trips_the_fixture_headers(family):
    """Every fixture tensor is named by the table exactly once, and to_hf(to_local(...)) gives
    the checkpoint back (names and values), with experts stacked as [E, in, out]."""
    hf = read_checkpoint(FIXTURES / family)
    module = mixtral if family == "mixtral" else qwen3_moe
    cfg = module.config_from_hf(models.hf.read_config(FIXTURES / family))
    table = module.weight_table(cfg, tie=False)
    names = [p.name for plist in table.values() for p in plist]
    assert sorted(names) == sorted(hf)
    shapes = {}
    for pname, plist in table.items():
        if pname.endswith(".expert_bias"):
            shapes[pname] = (4,)
        elif pname.endswith("experts.fc1"):
            shapes[pname] = (4, 64, 2 * cfg.moe.ffn_hidden_size)
        elif pname.endswith("experts.fc2"):
            shapes[pname] = (4, cfg.moe.ffn_hidden_size, 64)
        else:
            rows = sum(hf[p.name].shape[0] for p in plist)
            shapes[pname] = (rows,) + tuple(hf[plist[0].name].shape[1:])
    local = to_local(table, hf, shapes, {}, tp=1, rank=0)
    back = to_hf(table, local)
    assert set(back) == set(hf)
    for name, value in back.items():
        np.testing.assert_array_equal(value, hf[name].load(), err_msg=name)
