"""Greedy decoding with DEFAULT arguments (``models.generate``: compiled, static KV cache)
beside Hugging Face ``generate`` on the PyTorch twin of the same model, in the same run.

Model: the Llama of ``configs/tiny_llama_bench.yaml`` (vocabulary 32000, hidden 512, 4 layers,
8 heads / 2 kv heads, SwiGLU 1408, fp32), random weights, saved with ``save_pretrained``; the
twin is ``transformers.LlamaForCausalLM.from_pretrained`` of that directory. A 32-token prompt,
``NEW`` new tokens (no stop token), batch 1 and 8; ``ROUNDS`` timed rounds after a warm-up
call (compilation excluded from the rounds, reported on its own with the number of graphs).

new tokens/s = batch * NEW / seconds (best round; the median is printed too) and the ratio
msformers / HF per batch. The torch side runs in a subprocess (``hf_generate_worker.py``) under
the interpreter of ``$MSFORMERS_TORCH_PYTHON``, or this one when it can import torch and
transformers; without either, the reference is skipped with a note. Greedy tokens of the two
are compared (fraction equal; tiny fp32 differences may flip a near-tie late in a row).

    MSFORMERS_TORCH_PYTHON=/path/to/torch/python \
        .venv/bin/python -m pytest benchmarks/bench_decode.py -s
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
ms.set_device("CPU")

import models  # noqa: E402
from models.compiled_decode import decode_stats  # noqa: E402

PROMPT, NEW, ROUNDS, BATCHES = 32, 64, 3, (1, 8)
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
             "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
             "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu",
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
             "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
WORKER = Path(__file__).with_name("hf_generate_worker.py")


def _torch_python() -> str | None:
    if os.environ.get("MSFORMERS_TORCH_PYTHON"):
        return os.environ["MSFORMERS_TORCH_PYTHON"]
    have = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    return sys.executable if have else None


def _hf_reference(hf_dir: Path, prompts_file: Path) -> dict | None:
    python = _torch_python()
    if python is None:
        print("\nHF reference skipped: torch/transformers not importable here and "
              "MSFORMERS_TORCH_PYTHON not set")
        return None
    run = subprocess.run([python, str(WORKER), str(hf_dir), str(prompts_file), str(NEW),
                          str(ROUNDS)], capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        pytest.fail(f"hf_generate_worker failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_default_decode_vs_hf_generate(tmp_path):
    model = models.build_from_config(HF_CONFIG)
    model.save_pretrained(tmp_path / "hf")
    prompts = np.random.default_rng(0).integers(3, 32000, (max(BATCHES), PROMPT)).astype(np.int32)
    np.save(tmp_path / "prompts.npy", prompts)
    ours = {}
    for b in BATCHES:
        start = time.perf_counter()
        models.generate(model, prompts[:b], NEW)  # warm up: compiles this bucket's graphs
        warm = time.perf_counter() - start
        seconds = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            tokens = models.generate(model, prompts[:b], NEW)
            seconds.append(time.perf_counter() - start)
        ours[b] = {"tokens": tokens, "seconds": seconds, "warm_up": warm}
    stats = decode_stats(model)
    ref = _hf_reference(tmp_path / "hf", tmp_path / "prompts.npy")
    print(f"\ncompiled decode: {stats['graphs']} graphs in {stats['buckets']} buckets, "
          f"{stats['compile_seconds']:.1f} s compiling"
          + (f"; reference: {ref['versions']}" if ref else ""))
    for b in BATCHES:
        mine = b * NEW / min(ours[b]["seconds"])
        line = (f"greedy decode batch {b} ({PROMPT}+{NEW}): models.generate {mine:.1f} new tok/s "
                f"(median {b * NEW / statistics.median(ours[b]['seconds']):.1f}, first call "
                f"{ours[b]['warm_up']:.1f} s)")
        if ref is not None:
            theirs = b * NEW / min(ref[str(b)]["seconds"])
            same = np.mean(np.array(ours[b]["tokens"]) == np.array(ref[str(b)]["tokens"]))
            line += (f" | HF generate {theirs:.1f} new tok/s (median "
                     f"{b * NEW / statistics.median(ref[str(b)]['seconds']):.1f}) | "
                     f"x{mine / theirs:.2f} | tokens equal {same:.0%}")
        print(line)
        assert all(len(row) == NEW for row in ours[b]["tokens"])
