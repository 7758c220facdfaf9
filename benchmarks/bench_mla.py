"""Multi-latent attention decoding: the latent KV cache vs a full per-head K/V cache of the
same model, in one run.

Model: a GPTModel with MLA in every layer (hidden 256, 8 heads, 4 layers, vocab 4096,
``kv_lora_rank`` 64, ``qk_rope_head_dim`` 16, ``qk_nope_head_dim`` 32, ``v_head_dim`` 32, no
``q_lora_rank``: DeepSeek-V2-Lite's shape, scaled down), fp32, PyNative. Greedy decoding of
``NEW`` tokens after a ``PROMPT``-token prompt, batch ``BATCH``, with

- ``latent``: ``LatentKVCache`` (``model.new_cache()``): ``kv_lora_rank + qk_rope_head_dim``
  values per token and layer; attention in the latent space with ``kv_b_proj`` absorbed;
- ``full`` (the reference): a plain ``KVCache`` of the expanded per-head keys
  ``[n, qk_nope + qk_rope]`` and values ``[n, v_head_dim]`` of the same model and weights.

Both produce the same tokens (asserted). Reported: per-token cache bytes (read from the
caches' tensors after the run, over all layers), decode tokens/s of each (new tokens over the
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

from mcore.transformer import (KVCache, MLAConfig, RotaryConfig,  # noqa: E402
                               TransformerConfig, gpt_layer_specs)
from models.gpt import GPTModel  # noqa: E402

VOCAB, LAYERS, BATCH, PROMPT, NEW, ROUNDS = 4096, 4, 4, 128, 32, 3


@pytest.fixture(scope="module")
def model():
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=256, num_attention_heads=8,
                            ffn_hidden_size=512, multi_latent_attention=True,
                            mla=MLAConfig(q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
                                          qk_rope_head_dim=16, v_head_dim=32),
                            rotary=RotaryConfig(interleaved=True))
    return GPTModel(cfg, gpt_layer_specs(cfg), VOCAB)


def _decode(model, cache, prompt):
    """Greedy tokens ``[b, NEW]`` with ``cache`` (prefill, then one token per step)."""
    ids, out = ms.Tensor(prompt), []
    for _ in range(NEW):
        logits = model(ids, None, None, None, cache)  # [b, s, V]
        nxt = logits[:, -1, :].asnumpy().argmax(-1).astype(np.int32)
        out.append(nxt)
        ids = ms.Tensor(nxt[:, None])
    return np.stack(out, 1)


def _cache_bytes(cache) -> int:
    tensors = [t for t in list(cache.keys) + list(cache.values) if t is not None]
    return sum(t.asnumpy().nbytes for t in tensors)


def test_latent_vs_full_kv_cache_decode(benchmark, model):
    prompt = np.random.default_rng(0).integers(0, VOCAB, (BATCH, PROMPT)).astype(np.int32)
    caches, full_times, results = {}, [], {}

    def run_full():
        caches["full"] = KVCache(model.layer_range)
        start = time.perf_counter()
        results["full"] = _decode(model, caches["full"], prompt)
        full_times.append(time.perf_counter() - start)

    def run_latent():
        caches["latent"] = model.new_cache()
        results["latent"] = _decode(model, caches["latent"], prompt)

    run_full()  # warm up both paths
    run_latent()
    full_times.clear()
    benchmark.pedantic(run_latent, setup=run_full, rounds=ROUNDS, iterations=1)
    np.testing.assert_array_equal(results["latent"], results["full"])
    tokens = BATCH * (PROMPT + NEW - 1)  # positions held by a cache after the run
    per_token = {k: _cache_bytes(c) / tokens for k, c in caches.items()}
    latent_s = benchmark.stats.stats.min if benchmark.stats else float("nan")
    full_s = min(full_times)
    speed = {"latent": BATCH * NEW / latent_s, "full": BATCH * NEW / full_s}
    benchmark.extra_info.update(
        latent_bytes_per_token=per_token["latent"], full_bytes_per_token=per_token["full"],
        bytes_ratio=per_token["full"] / per_token["latent"],
        latent_tokens_per_s=speed["latent"], full_tokens_per_s=speed["full"],
        speed_ratio=speed["latent"] / speed["full"])
    print(f"\nMLA decode {BATCH}x({PROMPT}+{NEW}), {LAYERS} layers: KV-cache bytes/token latent "
          f"{per_token['latent']:.0f} | full K/V {per_token['full']:.0f} | full/latent "
          f"x{per_token['full'] / per_token['latent']:.1f}")
    print(f"decode tokens/s latent {speed['latent']:.1f} | full K/V (reference) "
          f"{speed['full']:.1f} | latent/full x{speed['latent'] / speed['full']:.2f}")
