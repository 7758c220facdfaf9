"""Rotary variants and core attention against numpy references."""
from __future__ import annotations

import math

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mcore.fusions.attention import (CoreAttention, blocked_attention,  # noqa: E402
                                     one_token_attention)
from mcore.transformer.config import RotaryConfig  # noqa: E402
from mcore.transformer.rotary import (RotaryEmbedding, apply_rotary,  # noqa: E402
                                      inverse_frequencies)


def rng(seed=0):
    return np.random.default_rng(seed)


def rope_ref(x, pos, base, rot, interleaved):
    """Rotate pairs of the first ``rot`` dims by angle pos * base^(-2i/rot) (complex numbers)."""
    inv = base ** (-np.arange(0, rot, 2) / rot)
    ang = pos[:, None] * inv[None, :]  # [s, r/2]
    xr = x[..., :rot]
    if interleaved:
        pairs = xr[..., 0::2] + 1j * xr[..., 1::2]
    else:
        pairs = xr[..., :rot // 2] + 1j * xr[..., rot // 2:]
    turned = pairs * np.exp(1j * ang)
    if interleaved:
        out = np.stack([turned.real, turned.imag], -1).reshape(xr.shape)
    else:
        out = np.concatenate([turned.real, turned.imag], -1)
    return np.concatenate([out, x[..., rot:]], -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rotary_matches_complex_rotation(interleaved, fraction):
    d, s = 16, 5
    rot = int(d * fraction)
    x = rng().standard_normal((2, 3, s, d)).astype(np.float32)
    pos = np.arange(3, 3 + s)
    emb = RotaryEmbedding(RotaryConfig(base=100.0, fraction=fraction, interleaved=interleaved), rot)
    cos, sin = emb(ms.Tensor(np.tile(pos, (2, 1)), ms.int32))
    got = apply_rotary(ms.Tensor(x), cos, sin, interleaved).asnumpy()
    np.testing.assert_allclose(got, rope_ref(x, pos, 100.0, rot, interleaved), atol=1e-5)


def test_llama3_scaling_bands():
    cfg = RotaryConfig(base=500000.0, scaling="llama3", factor=8.0, original_max_position=64)
    plain, _ = inverse_frequencies(RotaryConfig(base=500000.0), 32)
    scaled, factor = inverse_frequencies(cfg, 32)
    wavelen = 2 * math.pi / plain
    assert factor == 1.0
    np.testing.assert_allclose(scaled[wavelen < 64 / 4], plain[wavelen < 64 / 4])  # high freq kept
    np.testing.assert_allclose(scaled[wavelen > 64], plain[wavelen > 64] / 8, rtol=1e-6)  # low / 8


def test_yarn_interpolates_low_frequencies_and_scales_attention():
    cfg = RotaryConfig(base=10000.0, scaling="yarn", factor=4.0, original_max_position=64)
    plain, _ = inverse_frequencies(RotaryConfig(base=10000.0), 32)
    scaled, factor = inverse_frequencies(cfg, 32)
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1)
    np.testing.assert_allclose(scaled[0], plain[0], rtol=1e-6)  # fastest: extrapolated
    np.testing.assert_allclose(scaled[-1], plain[-1] / 4, rtol=1e-5)  # slowest: interpolated


def attention_ref(q, k, v, scale, key_mask=None, causal=True):
    b, n, s, d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    k = np.repeat(k, n // n_kv, 1)
    v = np.repeat(v, n // n_kv, 1)
    scores = q @ k.transpose(0, 1, 3, 2) * scale  # [b, n, s, t]
    allowed = np.arange(t)[None, :] <= np.arange(s)[:, None] + t - s
    if not causal:
        allowed = np.ones_like(allowed)
    allowed = np.broadcast_to(allowed, scores.shape).copy()
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :] > 0
    scores = np.where(allowed, scores, -1e30)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("n, n_kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block", [2, 3, 64])
def test_blocked_attention_matches_reference(n, n_kv, block):
    r = rng(n * 10 + n_kv)
    s, t, d = 5, 7, 8  # queries are the last 5 of 7 keys (as with a KV cache)
    q = r.standard_normal((2, n, s, d)).astype(np.float32)
    k = r.standard_normal((2, n_kv, t, d)).astype(np.float32)
    v = r.standard_normal((2, n_kv, t, d)).astype(np.float32)
    mask = np.ones((2, t), np.int32)
    mask[1, :2] = 0  # left padding in row 1
    got = blocked_attention(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v), 0.3, ms.Tensor(mask),
                            block).asnumpy()
    np.testing.assert_allclose(got, attention_ref(q, k, v, 0.3, mask), atol=1e-5)


@pytest.mark.parametrize("n_kv", [4, 2])
def test_bidirectional_attention_sees_every_unmasked_key(n_kv):
    r = rng(40 + n_kv)
    q = r.standard_normal((2, 4, 6, 8)).astype(np.float32)
    k = r.standard_normal((2, n_kv, 6, 8)).astype(np.float32)
    v = r.standard_normal((2, n_kv, 6, 8)).astype(np.float32)
    mask = np.ones((2, 6), np.int32)
    mask[0, 4:] = 0  # right padding in row 0 (an encoder batch)
    attn = CoreAttention(num_heads=4, scale=0.3, block_size=4, num_kv_heads=n_kv, causal=False)
    got = ms.jit(attn)(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v), ms.Tensor(mask)).asnumpy()
    np.testing.assert_allclose(got, attention_ref(q, k, v, 0.3, mask, causal=False), atol=1e-5)
    causal = attention_ref(q, k, v, 0.3, mask)
    assert np.abs(got - causal).max() > 1e-2  # the first queries now see later keys


def test_core_attention_composed_on_cpu_and_under_jit():
    attn = CoreAttention(num_heads=2, scale=0.5, block_size=4)
    assert not attn.use_fused
    r = rng(3)
    q, k, v = (ms.Tensor(r.standard_normal((1, 2, 9, 4)).astype(np.float32)) for _ in range(3))
    eager = attn(q, k, v).asnumpy()
    compiled = ms.jit(attn)(q, k, v).asnumpy()
    np.testing.assert_allclose(compiled, eager, atol=1e-6)
    np.testing.assert_allclose(eager, attention_ref(q.asnumpy(), k.asnumpy(), v.asnumpy(), 0.5),
                               atol=1e-5)


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_one_token_attention_matches_blocked(n_kv):
    """The decode step's attention (one query at ``q_offset`` over a static cache whose later
    slots hold stale values) equals the composed reference, with padding and packed segments,
    the offset as a Tensor or an int, in PyNative and under jit (CoreAttention dispatches to it)."""
    r = rng(50 + n_kv)
    t, d = 8, 4
    q = ms.Tensor(r.standard_normal((3, 4, 1, d)).astype(np.float32))
    k, v = (ms.Tensor(r.standard_normal((3, n_kv, t, d)).astype(np.float32)) for _ in range(2))
    mask = ms.Tensor(np.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 3, 3, 3]],
                              np.int32))  # plain, left-padded, three packed segments
    attn = ms.jit(CoreAttention(num_heads=4, scale=0.3, num_kv_heads=n_kv))
    for offset in (ms.Tensor(4, ms.int32), 6, ms.Tensor(7, ms.int32)):
        for key_mask in (None, mask):
            want = blocked_attention(q, k, v, 0.3, key_mask, q_offset=offset).asnumpy()
            got = one_token_attention(q, k, v, 0.3, key_mask, offset).asnumpy()
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            if key_mask is not None and isinstance(offset, ms.Tensor):  # one compilation
                np.testing.assert_allclose(attn(q, k, v, key_mask, offset).asnumpy(), want,
                                           rtol=1e-6, atol=1e-6)
    # the stale slots after the offset are hidden: changing them changes nothing
    k2 = k.asnumpy().copy()
    k2[:, :, 5:] = 100.0
    np.testing.assert_allclose(one_token_attention(q, ms.Tensor(k2), v, 0.3, mask, 4).asnumpy(),
                               one_token_attention(q, k, v, 0.3, mask, 4).asnumpy(), atol=1e-6)
