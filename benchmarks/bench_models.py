"""Forward and greedy-decode throughput of a small Llama (hidden 512, 4 layers, vocab 32000).

- ``test_forward_tokens_per_s``: one forward of [1, 256] tokens (PyNative, and compiled with
  ``mindspore.jit``), tokens/s = 256 / time.
- ``test_greedy_decode_tokens_per_s``: 32 new tokens after a 32-token prompt with the KV cache,
  PyNative (growing ``KVCache``) and compiled (``StaticKVCache`` under ``mindspore.jit``, compile
  time excluded), timed by pytest-benchmark; the reference printed beside each is the same
  generation without a cache (PyNative full recompute of the sequence at every step).

    .venv/bin/python -m pytest benchmarks/bench_models.py --benchmark-enable -s
"""
from __future__ import annotations

import time

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
ms.set_device("CPU")

import models  # noqa: E402
from mcore.transformer.config import AttentionConfig, TransformerConfig  # noqa: E402
from models import llama  # noqa: E402

VOCAB, SEQ, PROMPT, NEW = 32000, 256, 32, 32


@pytest.fixture(scope="module")
def model():
    cfg = TransformerConfig(num_layers=4, hidden_size=512, num_attention_heads=8,
                            num_query_groups=4, ffn_hidden_size=1408,
                            attention=AttentionConfig(block_size=256))
    return models.GPTModel(cfg, llama.layer_spec(cfg), VOCAB)


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_forward_tokens_per_s(benchmark, model, mode):
    ids = ms.Tensor(_ids((1, SEQ)))
    fn = ms.jit(model) if mode == "jit" else model
    fn(ids).asnumpy()  # warm up / compile

    def run():
        return fn(ids).asnumpy()

    benchmark.pedantic(run, rounds=3, iterations=1)
    seconds = benchmark.stats.stats.min if benchmark.stats else float("nan")
    benchmark.extra_info["tokens_per_s"] = SEQ / seconds
    print(f"\nforward [{mode}] 1x{SEQ}: {SEQ / seconds:.0f} tokens/s")


@pytest.fixture(scope="module")
def no_cache_reference(model):
    """(tokens, tokens/s) of the generation without a cache: every step recomputes it all."""
    prompt = _ids((1, PROMPT), seed=1)
    models.generate(model, prompt, 2, use_cache=False)  # warm up
    start = time.perf_counter()
    tokens = models.generate(model, prompt, NEW, use_cache=False)
    return tokens, NEW / (time.perf_counter() - start)


@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_greedy_decode_tokens_per_s(benchmark, model, no_cache_reference, mode):
    prompt = _ids((1, PROMPT), seed=1)
    compiled = mode == "jit"
    models.generate(model, prompt, 2, compiled=compiled)  # warm up (compiles the jit steps)

    def run():
        return models.generate(model, prompt, NEW, compiled=compiled)

    out = benchmark.pedantic(run, rounds=2, iterations=1)
    reference, no_cache = no_cache_reference
    assert out == reference  # the cache changes the cost, not the tokens
    seconds = benchmark.stats.stats.min if benchmark.stats else float("nan")
    cached = NEW / seconds
    benchmark.extra_info.update(tokens_per_s=cached, no_cache_tokens_per_s=no_cache)
    print(f"\ngreedy decode {PROMPT}+{NEW} [{mode}]: KV cache {cached:.1f} tokens/s | "
          f"no cache (reference, PyNative) {no_cache:.1f} tokens/s | x{cached / no_cache:.1f}")
