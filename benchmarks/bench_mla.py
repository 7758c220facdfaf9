"""Multi-latent attention decoding: the latent KV cache vs a full per-head K/V cache of the
same model, in one run.

Model: a GPTModel with MLA in every layer (hidden 256, 8 heads, 4 layers, vocab 4096,
``kv_lora_rank`` 64, ``qk_rope_head_dim`` 16, ``qk_nope_head_dim`` 32, ``v_head_dim`` 32, no
``q_lora_rank``: DeepSeek-V2-Lite's shape, scaled down), fp32. Greedy decoding of ``NEW``
tokens after a ``PROMPT``-token prompt, batch ``BATCH``, in PyNative (growing caches) and
compiled (``mindspore.jit`` steps over fixed-size caches, compile time excluded), with

- ``latent``: ``LatentKVCache`` / ``StaticLatentKVCache`` (``model.new_cache``):
  ``kv_lora_rank + qk_rope_head_dim`` values per token and layer; attention in the latent
  space with ``kv_b_proj`` absorbed;
- ``full`` (the reference): ``KVCache`` / ``StaticKVCache`` of the expanded per-head keys
  ``[n, qk_nope + qk_rope]`` and values ``[n, v_head_dim]`` of the same model and weights.

Both produce the same tokens (asserted). Reported: per-token cache bytes (read from the
caches' tensors over all layers, per written position), decode tokens/s of each (new tokens over the
time of the whole generation, prompt included; fastest of ``ROUNDS`` rounds, the reference
timed in each round's setup so that both see the same load) and the ratios. On a shared
machine only the ratios mean anything. Run alone::

    .venv/bin/python -m pytest benchmarks/bench_mla.py --benchmark-enable -s
"""
from __future__ import annotations

import time

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
ms.set_device("CPU")

from mindspore import nn  # noqa: E402

from mcore.transformer import (KVCache, MLAConfig, RotaryConfig, StaticKVCache,  # noqa: E402
                               TransformerConfig, gpt_layer_specs)
from models.gpt import GPTModel  # noqa: E402

VOCAB, LAYERS, BATCH, PROMPT, NEW, ROUNDS = 4096, 4, 2, 64, 16, 2
MAX_LEN = PROMPT + NEW


@pytest.fixture(scope="module")
def model():
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=256, num_attention_heads=8,
                            ffn_hidden_size=512, multi_latent_attention=True,
                            mla=MLAConfig(q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
                                          qk_rope_head_dim=16, v_head_dim=32),
                            rotary=RotaryConfig(interleaved=True))
    return GPTModel(cfg, gpt_layer_specs(cfg), VOCAB)


class _Step(nn.Cell):
    """One cached forward, then the static cache's position advanced (compiled together)."""

    def __init__(self, model, cache):
        super().__init__()
        self.model, self.cache = model, cache

    def construct(self, ids, positions):
        logits = self.model(ids, positions, None, None, self.cache)
        self.cache.advance(ids.shape[1])
        return logits


def _stepper(model, kind: str, mode: str):
    """``(step(ids, positions) -> logits, cache)`` for a fresh cache of ``kind`` in ``mode``."""
    cfg = model.config
    if mode == "pynative":
        cache = model.new_cache() if kind == "latent" else KVCache(model.layer_range)

        def step(ids, positions):
            return model(ids, positions, None, None, cache)
        return step, cache
    if kind == "latent":
        cache = model.new_cache(BATCH, MAX_LEN)
    else:
        shape = (BATCH, cfg.num_attention_heads, MAX_LEN, cfg.head_dim)
        cache = StaticKVCache(model.layer_range, shape, value_dim=cfg.mla.v_head_dim)
    return ms.jit(_Step(model, cache)), cache


def _decode(step, prompt):
    """Greedy tokens ``[b, NEW]`` (prefill, then one token per step)."""
    ids, out = prompt, []
    pos = np.broadcast_to(np.arange(PROMPT, dtype=np.int32), prompt.shape)
    for _ in range(NEW):
        logits = step(ms.Tensor(ids), ms.Tensor(np.ascontiguousarray(pos)))  # [b, s, V]
        nxt = logits[:, -1, :].asnumpy().argmax(-1).astype(np.int32)
        out.append(nxt)
        ids, pos = nxt[:, None], pos[:, -1:] + 1
    return np.stack(out, 1)


def _cache_bytes_per_token(cache) -> float:
    """Bytes of all layers' buffers over the positions they hold (static: ``MAX_LEN``)."""
    tensors = [t for t in list(cache.keys) + list(cache.values) if t is not None]
    return sum(t.asnumpy().nbytes for t in tensors) / (BATCH * tensors[0].shape[2])


@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_latent_vs_full_kv_cache_decode(benchmark, model, mode):
    prompt = np.random.default_rng(0).integers(0, VOCAB, (BATCH, PROMPT)).astype(np.int32)
    steppers = {kind: _stepper(model, kind, mode) for kind in ("full", "latent")}
    caches = {kind: c for kind, (_, c) in steppers.items()}
    full_times, results = [], {}

    def fresh(kind):
        if mode == "jit":
            caches[kind].rewind()
            return steppers[kind][0]
        steppers[kind] = _stepper(model, kind, mode)
        caches[kind] = steppers[kind][1]
        return steppers[kind][0]

    def run_full():
        step = fresh("full")
        start = time.perf_counter()
        results["full"] = _decode(step, prompt)
        full_times.append(time.perf_counter() - start)

    def run_latent():
        results["latent"] = _decode(fresh("latent"), prompt)

    run_full()  # warm up (and compile) both paths
    run_latent()
    full_times.clear()
    benchmark.pedantic(run_latent, setup=run_full, rounds=ROUNDS, iterations=1)
    np.testing.assert_array_equal(results["latent"], results["full"])
    per_token = {k: _cache_bytes_per_token(c) for k, c in caches.items()}
    latent_s = benchmark.stats.stats.min if benchmark.stats else float("nan")
    full_s = min(full_times)
    speed = {"latent": BATCH * NEW / latent_s, "full": BATCH * NEW / full_s}
    benchmark.extra_info.update(
        latent_bytes_per_token=per_token["latent"], full_bytes_per_token=per_token["full"],
        bytes_ratio=per_token["full"] / per_token["latent"],
        latent_tokens_per_s=speed["latent"], full_tokens_per_s=speed["full"],
        speed_ratio=speed["latent"] / speed["full"])
    print(f"\nMLA decode [{mode}] {BATCH}x({PROMPT}+{NEW}), {LAYERS} layers: KV-cache "
          f"bytes/token latent "
          f"{per_token['latent']:.0f} | full K/V {per_token['full']:.0f} | full/latent "
          f"x{per_token['full'] / per_token['latent']:.1f}")
    print(f"decode tokens/s latent {speed['latent']:.1f} | full K/V (reference) "
          f"{speed['full']:.1f} | latent/full x{speed['latent'] / speed['full']:.2f}")
