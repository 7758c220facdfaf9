"""Training-step cost of LoRA against full fine-tuning of the same model (graph mode, one process).

A Llama-style model (hidden 512, 4 layers, vocab 8000, seq 256, batch 2): ``TrainStep``
(forward + backward + AdamW) with every weight trained (the reference, measured in the same run)
and with LoRA (r 8 on every attention and MLP projection, base frozen). Printed: step time of
each, their ratio, the trainable fraction, and the FLOP estimate ``(4 N + 2 n) / 6 N`` the
training log prints (frozen weights need no weight gradient; the optimizer touches n only).

    .venv/bin/python -m pytest benchmarks/bench_lora.py --benchmark-enable -s
"""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
ms.set_device("CPU")

import models  # noqa: E402
from mcore.parallel_state import ParallelDims  # noqa: E402
from models.peft import apply_lora, trainable_summary  # noqa: E402
from training.config import load_config  # noqa: E402
from training.step import TrainStep, set_mode  # noqa: E402

HF = {"model_type": "llama", "vocab_size": 8000, "hidden_size": 512, "intermediate_size": 1408,
      "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
      "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SEQ, BATCH = 256, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch():
    ids = np.random.default_rng(0).integers(0, HF["vocab_size"], (BATCH, SEQ + 1)).astype(np.int32)
    return [(ids[:, :-1], ids[:, 1:])]


def _step(lora: bool):
    set_mode("graph")
    model = models.build_from_config(dict(HF))
    if lora:
        apply_lora(model, r=8, alpha=16, target_modules=TARGETS)
    step = TrainStep(model, ParallelDims.single(), load_config(None).optimizer, 1)
    step(_batch(), 1e-4)  # compile
    return model, step


@pytest.fixture(scope="module")
def full_step_seconds():
    import time

    _, step = _step(lora=False)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step(_batch(), 1e-4)
        times.append(time.perf_counter() - t0)
    return min(times)


def test_lora_step_vs_full_fine_tuning(benchmark, full_step_seconds):
    model, step = _step(lora=True)
    batch = _batch()
    benchmark.pedantic(lambda: step(batch, 1e-4), rounds=3, iterations=1)
    seconds = benchmark.stats.stats.min if benchmark.stats else float("nan")
    s = trainable_summary(model)
    flops = (4 * s["total"] + 2 * s["trainable"]) / (6 * s["total"])
    benchmark.extra_info.update(full_step_s=full_step_seconds, lora_step_s=seconds,
                                trainable_fraction=s["fraction"], flop_ratio_estimate=flops)
    print(f"\nLoRA step {seconds * 1e3:.0f} ms vs full fine-tuning {full_step_seconds * 1e3:.0f} ms"
          f" (ratio {seconds / full_step_seconds:.2f}; FLOP estimate {flops:.2f}); trainable "
          f"{s['trainable']:,} of {s['total']:,} ({100 * s['fraction']:.2f}%)")
