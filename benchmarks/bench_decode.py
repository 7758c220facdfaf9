"""Greedy decoding with DEFAULT arguments (``models.generate``: compiled, static KV cache)
beside Hugging Face ``generate`` on the PyTorch twin of the same model, in the same run.

Model: the Llama of ``configs/tiny_llama_bench.yaml`` (vocabulary 32000, hidden 512, 4 layers,
8 heads / 2 kv heads, SwiGLU 1408, fp32), random weights, saved with ``save_pretrained``; the
twin is ``transformers.LlamaForCausalLM.from_pretrained`` of that directory. A 32-token prompt,
``NEW`` new tokens (no stop token), batch 1 and 8; ``ROUNDS`` timed rounds of each, the two
alternating (a persistent torch worker), after a warm-up call (compilation excluded from the
rounds, reported on its own with the number of graphs).

new tokens/s = batch * NEW / seconds (best round; the median is printed too) and the ratio
msformers / HF per batch. The torch side runs in a subprocess (``hf_generate_worker.py``) under
the interpreter of ``$MSFORMERS_TORCH_PYTHON``, or this one when it can import torch and
transformers; without either, the reference is skipped with a note. Greedy tokens of the two
are compared (fraction equal; tiny fp32 differences may flip a near-tie late in a row).
Gated (``benchmarks/gate.py``): ``decode.batch{b}_vs_hf`` = our new tok/s / HF's, per batch; the
pytest-benchmark record itself times one more batch-1 call.

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
from benchmarks.gate import gate_value  # noqa: E402
from models.compiled_decode import decode_stats  # noqa: E402

PROMPT, NEW, ROUNDS, BATCHES = 32, 64, 5, (1, 8)
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


class _HFWorker:
    """``hf_generate_worker.py`` in a subprocess: ``run(b) -> (tokens, seconds)``."""

    def __init__(self, python: str, hf_dir: Path, prompts_file: Path):
        # env=os.environ: MindSpore sets OMP_NUM_THREADS=1 in the C environment once it has run
        # an op, which a child would inherit; the reference keeps torch's own thread default.
        self.proc = subprocess.Popen([python, str(WORKER), str(hf_dir), str(prompts_file),
                                      str(NEW)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ))
        self.versions = self._answer()["versions"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"hf_generate_worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def run(self, b: int) -> tuple:
        self.proc.stdin.write(f"{b}\n")
        self.proc.stdin.flush()
        out = self._answer()
        return out["tokens"], out["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _time_ours(model, prompts) -> tuple:
    start = time.perf_counter()
    tokens = models.generate(model, prompts, NEW)
    return tokens, time.perf_counter() - start


def test_default_decode_vs_hf_generate(benchmark, tmp_path):
    model = models.build_from_config(HF_CONFIG)
    model.save_pretrained(tmp_path / "hf")
    prompts = np.random.default_rng(0).integers(3, 32000, (max(BATCHES), PROMPT)).astype(np.int32)
    np.save(tmp_path / "prompts.npy", prompts)
    python = _torch_python()
    hf = None if python is None else _HFWorker(python, tmp_path / "hf", tmp_path / "prompts.npy")
    ours, ref, warm = {b: [] for b in BATCHES}, {b: [] for b in BATCHES}, {}
    for b in BATCHES:
        warm[b] = _time_ours(model, prompts[:b])[1]  # compiles this bucket's graphs
        for _ in range(ROUNDS):  # alternate the two, so both see the same machine load
            ours[b].append(_time_ours(model, prompts[:b]))
            if hf is not None:
                ref[b].append(hf.run(b))
    if hf is not None:
        hf.close()
    stats = decode_stats(model)
    print(f"\ncompiled decode: {stats['graphs']} graphs in {stats['buckets']} buckets, "
          f"{stats['compile_seconds']:.1f} s compiling"
          + (f"; reference: {hf.versions}" if hf else "; HF reference skipped: torch/transformers"
             " not importable here and MSFORMERS_TORCH_PYTHON not set"))
    for b in BATCHES:
        secs = [s for _, s in ours[b]]
        mine = b * NEW / min(secs)
        line = (f"greedy decode batch {b} ({PROMPT}+{NEW}): models.generate {mine:.1f} new tok/s "
                f"(median {b * NEW / statistics.median(secs):.1f}, first call {warm[b]:.1f} s)")
        if hf is not None:
            theirs_s = [s for _, s in ref[b]]
            theirs = b * NEW / min(theirs_s)
            same = np.mean(np.array(ours[b][-1][0]) == np.array(ref[b][-1][0]))
            line += (f" | HF generate {theirs:.1f} new tok/s (median "
                     f"{b * NEW / statistics.median(theirs_s):.1f}) | x{mine / theirs:.2f} | "
                     f"tokens equal {same:.0%}")
            gate_value(benchmark, f"decode.batch{b}_vs_hf", mine / theirs, "higher")
        benchmark.extra_info[f"batch{b}_new_tok_s"] = mine
        print(line)
        assert all(len(row) == NEW for row in ours[b][-1][0])
    benchmark.pedantic(_time_ours, args=(model, prompts[:1]), rounds=1, iterations=1)
