"""Qwen v1 (legacy/qwen_v1.py, remote code, ``model_type`` "qwen") against a numpy forward
written from the public modeling code: ``c_attn = [q; k; v]`` with bias, partial half-split
RoPE (``rotary_pct``, ``rotary_emb_base``), MLP ``c_proj(w1(x) * silu(w2(x)))`` of width
``intermediate_size / 2``, ``no_bias``. Random tiny checkpoints under Qwen's tensor names and
config keys; see tests/legacy/remote_ref.py for the checks (logits 1e-4, greedy, KV cache,
save round trip)."""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from legacy import qwen_v1  # noqa: E402
from tests.legacy import remote_checkpoints as rc  # noqa: E402
from tests.legacy.remote_ref import (causal_attention, check_family, rmsnorm,  # noqa: E402
                                     rope, silu)

V, H, N, I, L = rc.VOCAB, rc.HIDDEN, rc.HEADS, rc.QWEN_FFN, rc.LAYERS
D = H // N


make = rc.qwen_v1_tensors


def forward(t, ids, bias, pct, base=20000.0, eps=1e-6):
    def linear(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    x = t["transformer.wte.weight"][ids]
    b, s = ids.shape
    for i in range(L):
        p = f"transformer.h.{i}."
        y = rmsnorm(x, t[p + "ln_1.weight"], eps)
        q, k, v = (z.reshape(b, s, N, D) for z in np.split(linear(y, p + "attn.c_attn"), 3, -1))
        rot = int(D * pct)
        q, k = rope(q, rot, base), rope(k, rot, base)
        x = x + linear(causal_attention(q, k, v), p + "attn.c_proj")
        y = rmsnorm(x, t[p + "ln_2.weight"], eps)
        x = x + linear(linear(y, p + "mlp.w1") * silu(linear(y, p + "mlp.w2")), p + "mlp.c_proj")
    x = rmsnorm(x, t["transformer.ln_f.weight"], eps)
    return (x @ t["lm_head.weight"].T).astype(np.float32)


config = rc.qwen_v1_config


@pytest.mark.parametrize("bias,pct", [(False, 0.5), (True, 1.0)])
def test_qwen_v1_matches_numpy(tmp_path, bias, pct):
    t = make(np.random.default_rng(3), bias)
    check_family(tmp_path, config(bias, pct), t, lambda ids: forward(t, ids, bias, pct))


def test_odd_intermediate_size_is_refused():
    with pytest.raises(ValueError, match="intermediate_size=191"):
        qwen_v1.config_from_hf({**config(False, 1.0), "intermediate_size": 191})
