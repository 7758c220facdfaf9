"""InternLM v1 (legacy/internlm.py, remote code, ``model_type`` "internlm") against a numpy
forward written from the public modeling code: the Llama layer with biases on q/k/v/o
(``bias``), RoPE base from ``rotary.base``. A random tiny checkpoint under InternLM's tensor
names and config keys; see tests/legacy/remote_ref.py for the checks (logits 1e-4, greedy, KV
cache, save round trip)."""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from legacy import internlm  # noqa: E402
from tests.legacy.remote_ref import (causal_attention, check_family, rand, rmsnorm,  # noqa: E402
                                     rope, swiglu)

V, H, N, F, L = 128, 64, 4, 96, 2
D = H // N
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def make(rng):
    t = {"model.embed_tokens.weight": rand(rng, V, H, scale=0.5),
         "model.norm.weight": rand(rng, H, offset=1.0), "lm_head.weight": rand(rng, V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": rand(rng, H, offset=1.0),
                  p + "post_attention_layernorm.weight": rand(rng, H, offset=1.0),
                  p + "mlp.gate_proj.weight": rand(rng, F, H),
                  p + "mlp.up_proj.weight": rand(rng, F, H),
                  p + "mlp.down_proj.weight": rand(rng, H, F)})
        for name in PROJ:
            t[f"{p}self_attn.{name}.weight"] = rand(rng, H, H)
            t[f"{p}self_attn.{name}.bias"] = rand(rng, H)
    return t


def forward(t, ids, base=40000.0, eps=1e-6):
    x = t["model.embed_tokens.weight"][ids]
    b, s = ids.shape
    for i in range(L):
        p = f"model.layers.{i}."
        w = {n: (t[f"{p}self_attn.{n}.weight"], t[f"{p}self_attn.{n}.bias"]) for n in PROJ}
        proj = {n: (lambda z, n=n: z @ w[n][0].T + w[n][1]) for n in PROJ}
        y = rmsnorm(x, t[p + "input_layernorm.weight"], eps)
        q, k, v = (proj[n](y).reshape(b, s, N, D) for n in PROJ[:3])
        q, k = rope(q, D, base), rope(k, D, base)
        x = x + proj["o_proj"](causal_attention(q, k, v))
        y = rmsnorm(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + swiglu(y, t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"],
                       t[p + "mlp.down_proj.weight"])
    x = rmsnorm(x, t["model.norm.weight"], eps)
    return (x @ t["lm_head.weight"].T).astype(np.float32)


CONFIG = {"architectures": ["InternLMForCausalLM"], "model_type": "internlm", "vocab_size": V,
          "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L,
          "num_attention_heads": N, "hidden_act": "silu", "max_position_embeddings": 64,
          "rms_norm_eps": 1e-6, "bias": True, "rotary": {"base": 40000, "type": "dynamic"},
          "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def test_internlm_matches_numpy(tmp_path):
    t = make(np.random.default_rng(6))
    check_family(tmp_path, CONFIG, t, lambda ids: forward(t, ids))


def test_rotary_mapping():
    assert internlm.config_from_hf({**CONFIG, "rotary": None, "rope_theta": 5e4}).rotary.base == 5e4
    with pytest.raises(ValueError, match="rotary.type='yarn'"):
        internlm.config_from_hf({**CONFIG, "rotary": {"base": 1e4, "type": "yarn"}})
