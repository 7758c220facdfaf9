"""InternLM2 (legacy/internlm2.py, remote code) against a numpy forward written from the public
modeling code: ``wqkv`` packed by key/value group (``[g, qg + 2, d]`` rows: a group's query
heads, its key, its value), GQA, RoPE (plain and linear-scaled), optional biases
(``bias``). Random tiny checkpoints under InternLM2's tensor names and config keys; see
tests/legacy/remote_ref.py for the checks (logits 1e-4, greedy, KV cache, save round trip)."""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from legacy import internlm2  # noqa: E402
from tests.legacy import remote_checkpoints as rc  # noqa: E402
from tests.legacy.remote_ref import (InMemoryTensor, causal_attention, check_family,  # noqa: E402
                                     rmsnorm, rope, swiglu)

V, H, N, G, F, L = rc.VOCAB, rc.HIDDEN, rc.HEADS, rc.GROUPS, rc.FFN, rc.LAYERS
D = H // N


make = rc.internlm2_tensors


def forward(t, ids, bias, factor, base=50000.0, eps=1e-5):
    x = t["model.tok_embeddings.weight"][ids]
    b, s = ids.shape
    qg = N // G
    for i in range(L):
        p = f"model.layers.{i}."
        y = rmsnorm(x, t[p + "attention_norm.weight"], eps)
        qkv = y @ t[p + "attention.wqkv.weight"].T
        if bias:
            qkv = qkv + t[p + "attention.wqkv.bias"]
        qkv = qkv.reshape(b, s, G, qg + 2, D)  # [b, s, (g (qg + 2) d)] -> [b, s, g, qg + 2, d]
        q = qkv[:, :, :, :qg].reshape(b, s, N, D)
        k, v = qkv[:, :, :, qg], qkv[:, :, :, qg + 1]  # [b, s, g, d]
        q, k = rope(q, D, base, factor=factor), rope(k, D, base, factor=factor)
        att = causal_attention(q, k, v) @ t[p + "attention.wo.weight"].T
        x = x + (att + t[p + "attention.wo.bias"] if bias else att)
        y = rmsnorm(x, t[p + "ffn_norm.weight"], eps)
        x = x + swiglu(y, t[p + "feed_forward.w1.weight"], t[p + "feed_forward.w3.weight"],
                       t[p + "feed_forward.w2.weight"])
    x = rmsnorm(x, t["model.norm.weight"], eps)
    return (x @ t["output.weight"].T).astype(np.float32)


config = rc.internlm2_config


@pytest.mark.parametrize("bias,scaling", [(False, None), (True, {"type": "linear", "factor": 2.0})])
def test_internlm2_matches_numpy(tmp_path, bias, scaling):
    t = make(np.random.default_rng(2), bias)
    factor = scaling["factor"] if scaling else 1.0
    check_family(tmp_path, config(bias, scaling), t, lambda ids: forward(t, ids, bias, factor))


def test_rope_scaling_mapping():
    dynamic = internlm2.config_from_hf(config(False, {"type": "dynamic", "factor": 2.0}))
    assert dynamic.rotary.scaling == "none" and dynamic.rotary.base == 50000.0
    with pytest.raises(ValueError, match="rope_scaling.type='yarn'"):
        internlm2.config_from_hf(config(False, {"type": "yarn", "factor": 2.0}))


@pytest.mark.parametrize("tp", [1, 2])
def test_grouped_wqkv_splits_by_head_on_each_tp_rank_and_round_trips(tp):
    from models.weights import to_hf, to_local

    cfg = internlm2.config_from_hf({**config(True, None), "num_hidden_layers": 1})
    table = {k: v for k, v in internlm2.weight_table(cfg, False).items() if "linear_qkv" in k}
    wqkv = np.random.default_rng(0).standard_normal(((N + 2 * G) * D, H)).astype(np.float32)
    bias = np.arange((N + 2 * G) * D, dtype=np.float32)
    hf = {"model.layers.0.attention.wqkv.weight": InMemoryTensor(wqkv),
          "model.layers.0.attention.wqkv.bias": InMemoryTensor(bias)}
    name = "decoder.layers.0.self_attention.linear_qkv."
    shapes = {name + "weight": ((N + 2 * G) * D // tp, H), name + "bias": ((N + 2 * G) * D // tp,)}
    dims = dict.fromkeys(shapes, 0)
    ranks = [to_local(table, hf, shapes, dims, tp, r) for r in range(tp)]
    view = bias.reshape(G, N // G + 2, D)  # [g, qg + 2, d]
    q, k, v = view[:, :N // G].reshape(N, D), view[:, -2], view[:, -1]  # heads in order
    for r, local in enumerate(ranks):  # rank r: its query heads, then its kv heads
        part = [z[r * len(z) // tp:(r + 1) * len(z) // tp].ravel() for z in (q, k, v)]
        np.testing.assert_array_equal(local[name + "bias"], np.concatenate(part))
    full = {p: np.concatenate([local[p] for local in ranks]) for p in shapes}
    back = to_hf(table, full, dims, tp)
    np.testing.assert_array_equal(back["model.layers.0.attention.wqkv.weight"], wqkv)
    np.testing.assert_array_equal(back["model.layers.0.attention.wqkv.bias"], bias)
