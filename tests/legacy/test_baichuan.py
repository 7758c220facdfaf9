"""Baichuan / Baichuan2 (legacy/baichuan.py, remote code) against a numpy forward written from
the public modeling code: packed ``W_pack = [q; k; v]``, RoPE (7B) or ALiBi (13B), NormHead
(unit-norm rows of ``lm_head``). Random tiny checkpoints under Baichuan's tensor names and
config keys; see tests/legacy/remote_ref.py for the checks (logits 1e-4, greedy, KV cache,
save round trip)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from legacy import baichuan  # noqa: E402
from tests.legacy import remote_checkpoints as rc  # noqa: E402
from tests.legacy.remote_ref import (causal_attention, check_family, rmsnorm, rope,  # noqa: E402
                                     swiglu)

L = rc.LAYERS


def slopes(n):
    """Baichuan's ALiBi slopes: the power-of-two series of the largest power p <= n, then every
    other slope of the 2p series."""
    def series(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]
    p = 2 ** math.floor(math.log2(n))
    return np.array(series(p) + series(2 * p)[0::2][:n - p])


def forward(t, ids, h, n, alibi, eps=1e-6):
    d = h // n
    x = t["model.embed_tokens.weight"][ids]
    b, s = ids.shape
    bias = None
    if alibi:  # slope * (key - last position): a per-row shift of slope * (key - query)
        bias = slopes(n)[:, None, None] * (np.arange(s)[None, None, :] - (s - 1))
        bias = np.broadcast_to(bias, (n, s, s))
    for i in range(L):
        p = f"model.layers.{i}."
        y = rmsnorm(x, t[p + "input_layernorm.weight"], eps)
        q, k, v = np.split(y @ t[p + "self_attn.W_pack.weight"].T, 3, -1)
        q, k, v = (z.reshape(b, s, n, d) for z in (q, k, v))
        if not alibi:
            q, k = rope(q, d, 10000.0), rope(k, d, 10000.0)
        x = x + causal_attention(q, k, v, bias) @ t[p + "self_attn.o_proj.weight"].T
        y = rmsnorm(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + swiglu(y, t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"],
                       t[p + "mlp.down_proj.weight"])
    x = rmsnorm(x, t["model.norm.weight"], eps)
    w = t["lm_head.weight"]
    w = w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)  # NormHead
    return (x @ w.T).astype(np.float32)


@pytest.mark.parametrize("h,n,position", [(64, 4, "rope"), (48, 6, "alibi")])
def test_baichuan2_matches_numpy(tmp_path, h, n, position):
    t, config = rc.baichuan(np.random.default_rng(1), h, n, position)
    model = check_family(tmp_path, config, t,
                         lambda ids: forward(t, ids, h, n, position == "alibi"))
    assert model.config.norm_head and model.config.position_embedding == position


def test_config_mapping_follows_the_public_configs():
    seven = {"model_type": "baichuan", "hidden_size": 4096, "num_attention_heads": 32,
             "num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 125696}
    thirteen = {**seven, "hidden_size": 5120, "num_attention_heads": 40,
                "num_hidden_layers": 40, "intermediate_size": 13696}
    cfg7, cfg13 = baichuan.config_from_hf(seven), baichuan.config_from_hf(thirteen)
    assert (cfg7.position_embedding, cfg13.position_embedding) == ("rope", "alibi")
    assert cfg7.norm_head and cfg13.norm_head  # Baichuan2's vocabulary
    assert not baichuan.config_from_hf({**seven, "vocab_size": 64000}).norm_head  # Baichuan 1
    with pytest.raises(ValueError, match="position_embedding='learned'"):
        baichuan.config_from_hf({**seven, "position_embedding": "learned"})
