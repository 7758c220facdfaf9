"""The registry op "decode_layer" (``csrc/decode_layer.cc``): a dense layer's one-token step over
a StaticKVCache in one kernel, against the composed step of the same ``TransformerLayer``
(hidden states and cache writes), in the compiled decoder (greedy tokens of the HF fixture
elsewhere: tests/models/test_generate_and_errors.py), and the same bits for any thread count."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from mcore.fusions import decode_layer, registry  # noqa: E402
from tests.mcore.fusions.test_small_matmul import assert_same_bits_per_pool_size  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[3]
LLAMA = REPO_ROOT / "tests" / "fixtures" / "hf" / "llama"


@pytest.fixture(scope="module")
def model():
    if registry.choice("decode_layer") != "cpu_kernel":
        pytest.skip("decode_layer kernel not chosen here (MSFORMERS_FUSIONS / no compiler)")
    return models.from_pretrained(LLAMA)


def _prefill(model, ids, mask, cache_len):
    """A cache after the left-padded prompts; returns ``(cache, key_mask [b, T], positions)``."""
    b, w = ids.shape
    cache = model.new_cache(b, cache_len)
    key_mask = np.pad(mask, ((0, 0), (0, cache_len - w)), constant_values=1).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)  # [b, W]
    model.last_logits(ms.Tensor(ids), ms.Tensor(positions), ms.Tensor(key_mask), cache)
    cache.advance(w)
    return cache, ms.Tensor(key_mask), positions[:, -1:] + 1


@pytest.mark.parametrize("batch", [1, decode_layer.LAYER_ROWS])
def test_each_layer_matches_the_composed_step(model, batch):
    assert all(layer.use_decode_kernel for layer in model.decoder.layers)
    rng = np.random.default_rng(batch)
    lengths = rng.integers(1, 7, batch)
    lengths[0] = 6
    ids = rng.integers(3, 250, (batch, 6)).astype(np.int32)
    mask = (np.arange(6)[None] >= 6 - lengths[:, None]).astype(np.int32)  # left padding
    cache, key_mask, pos = _prefill(model, ids, mask, 16)
    differs = False  # the kernel ran: another summation order, other last bits somewhere
    for step in range(2):  # two tokens: the second attends to the first one's cache write
        token = ms.Tensor(rng.integers(3, 250, (batch, 1)).astype(np.int32))
        x, cos, sin = model._enter(token, ms.Tensor(pos), cache)
        for layer in model.decoder.layers:
            slot = layer.layer_number - cache.first
            keys, values = cache.keys[slot], cache.values[slot]
            before = keys.asnumpy().copy(), values.asnumpy().copy()
            layer.use_decode_kernel = False
            try:
                want = layer(x, cos, sin, key_mask, cache).asnumpy()
            finally:
                layer.use_decode_kernel = True
            written = keys.asnumpy().copy(), values.asnumpy().copy()
            keys.set_data(ms.Tensor(before[0]))
            values.set_data(ms.Tensor(before[1]))
            got = layer(x, cos, sin, key_mask, cache)
            np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5, atol=1e-5)
            differs |= got.asnumpy().tobytes() != want.tobytes()
            at = 6 + step  # the slot written: everything else unchanged
            for buf, ref, old in zip((keys, values), written, before):
                new = buf.asnumpy()
                np.testing.assert_allclose(new[:, :, at], ref[:, :, at], rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(np.delete(new, at, 2), np.delete(old, at, 2))
            x = got
        cache.advance(1)
        pos = pos + 1
    assert differs


def test_compiled_step_takes_the_kernel(model, monkeypatch):
    """The compiled decoder's step with the kernel agrees with the composed one (and is not the
    same graph: the logits differ in the last bits)."""
    composed = models.from_pretrained(LLAMA)
    for layer in composed.decoder.layers:
        layer.use_decode_kernel = False
    prompts = [[5, 9, 200, 31, 7, 66], [77, 12, 3]]
    assert models.generate(model, prompts, 8) == models.generate(composed, prompts, 8)
    ids = np.array([[0, 0, 77, 12], [5, 9, 200, 31]], np.int32)
    mask = (ids > 0).astype(np.int32)
    steps = []
    for m in (model, composed):
        from models.compiled_decode import decoder_for
        dec, _ = decoder_for(m, 2, 4, 4)
        dec.start()
        full = dec.full_mask(np.pad(mask, ((0, 0), (12, 0))))
        wide = np.pad(ids, ((0, 0), (12, 0)))
        positions = np.maximum(np.cumsum(np.pad(mask, ((0, 0), (12, 0))), 1) - 1, 0)
        nxt, pos, _ = dec.step(ms.Tensor(wide), ms.Tensor(positions.astype(np.int32)), full)
        steps.append(dec.step(nxt, pos, full)[2].asnumpy())
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-4, atol=1e-5)
    assert steps[0].tobytes() != steps[1].tobytes()


_THREADS_SCRIPT = """
import ctypes, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1])
rng = np.random.default_rng(0)
b, h, n, n_kv, d, f, t, r = 3, 256, 8, 2, 32, 1024, 16, 16
arrays = [rng.standard_normal((b, 1, h)).astype(np.float32),
          np.cos(rng.standard_normal((b, 1, 1, r))).astype(np.float32),
          np.sin(rng.standard_normal((b, 1, 1, r))).astype(np.float32),
          np.array([[1] * t, [0] * 3 + [1] * (t - 3), [1, 1, 2, 2, 2] + [2] * (t - 5)], np.int32),
          np.array(9, np.int32),
          rng.standard_normal((b, n_kv, t, d)).astype(np.float32),
          rng.standard_normal((b, n_kv, t, d)).astype(np.float32),
          (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
          (0.05 * rng.standard_normal(((n + 2 * n_kv) * d, h))).astype(np.float32),
          (0.05 * rng.standard_normal((h, n * d))).astype(np.float32),
          (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
          (0.05 * rng.standard_normal((2 * f, h))).astype(np.float32),
          (0.05 * rng.standard_normal((h, f))).astype(np.float32),
          np.array([1e-5, 1e-6, d ** -0.5], np.float32),
          np.full((b, 1, h), np.nan, np.float32)]
dims = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
rc = lib.DecodeLayerStep(15, (ctypes.c_void_p * 15)(*[a.ctypes.data for a in arrays]),
                         (ctypes.c_int * 15)(*[a.ndim for a in arrays]),
                         (ctypes.POINTER(ctypes.c_int64) * 15)(*dims),
                         (ctypes.c_char_p * 15)(*[str(a.dtype).encode() for a in arrays]),
                         None, None)
assert rc == 0
np.save(sys.stdout.buffer, np.concatenate([arrays[i].ravel() for i in (14, 5, 6)]))
"""


def test_same_bits_for_any_thread_count():
    """Weights above the pool's 1 MB threshold (fc1, fc2): helpers join; one process per count."""
    assert_same_bits_per_pool_size(_THREADS_SCRIPT)


def test_only_the_dense_llama_layer_is_eligible():
    layer = models.from_pretrained(LLAMA).decoder.layers[0]
    assert decode_layer.eligible(layer)
    layer.self_attention.interleaved = True  # GLM's rotary layout: composed
    assert not decode_layer.eligible(layer)
