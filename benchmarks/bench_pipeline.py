"""Pipeline step time: pp=2 (1F1B, 2 ranks) vs pp=1 (one process), 8 micro-batches.

The model is a tiny Llama ``GPTModel`` (hidden 64, 4 heads, 2 kv heads, ffn 128, vocab 256,
8 layers; micro-batch 4 x 64 tokens) split into stages by ``models.gpt_pipeline.
build_gpt_pipeline``: pp=2 split 5 + 3 (stage 1 also runs the final norm, the head and the
loss), pp=1 the whole model as one stage. At this size a stage's compute per micro-batch is a
few milliseconds, comparable to one exchange (~1 ms), so the measured bubble also contains
communication and launch overhead.

This pytest process is rank 0 of a real 2-rank job; rank 1 and the scheduler are subprocesses
running this file. Before each timed pp=2 step rank 0 tells rank 1 to run one too (untimed).
The pp=1 reference runs the whole model in this process with no communication (rank 1 idles).
Each pp=2 row prints the measured bubble fraction of rank 0, ``1 - busy / step`` (``busy``: wall
time inside its forwards and backwards, synchronised after each), beside the theoretical
``(p - 1) / (m + p - 1)``. Run alone::

    .venv/bin/python -m pytest benchmarks/bench_pipeline.py --benchmark-enable -s
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.comm_ops import next_command  # noqa: E402
from tests.multirank import REPO_ROOT, free_port, rank_env  # noqa: E402

M, MBS, SEQ, VOCAB, SPLIT = 8, 4, 64, 256, [5, 3]
HF = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=128, vocab_size=VOCAB, num_hidden_layers=sum(SPLIT),
          rms_norm_eps=1e-5, max_position_embeddings=SEQ, tie_word_embeddings=False)
STEP, IDLE, STOP = 1.0, 2.0, -1.0


def _model(dims, pp):
    from models.gpt_pipeline import build_gpt_pipeline

    model = build_gpt_pipeline(HF, dims, layers_per_stage=SPLIT if pp == 2 else None)
    model.time_actions = True
    return model


def _batches():
    import mindspore as ms

    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (M, MBS, SEQ + 1)).astype(np.int32)   # labels: next tokens
    return [(ms.Tensor(ids[i, :, :-1]), ms.Tensor(ids[i, :, 1:])) for i in range(M)]


def _forward_step(data_iterator, chunk):
    return next(data_iterator)


def _step(model, pp):
    from mcore.pipeline_parallel.schedules import get_forward_backward_func

    return get_forward_backward_func(pp)(_forward_step, iter(_batches()), model, M, SEQ, MBS)


def _peer() -> None:
    """Rank 1: run one pp=2 step per STEP command until STOP."""
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(pp=2)
    model = _model(dims, 2)
    while (command := next_command(dims.pp, 0.0)) != STOP:
        if command == STEP:
            _step(model, 2)


@pytest.fixture(scope="module")
def dims():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "benchmarks/bench_pipeline.py"], cwd=REPO_ROOT,
                              env=rank_env(2, port, role, rank))
             for role, rank in (("MS_SCHED", None), ("MS_WORKER", 1))]
    os.environ.update({k: v for k, v in rank_env(2, port, "MS_WORKER", 0).items()
                       if k.startswith("MS_")})
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(pp=2)
    yield dims
    next_command(dims.pp, STOP)
    procs[1].wait(timeout=60)


def test_step_pp1_one_process(benchmark, dims):
    from mcore.parallel_state import ParallelDims

    model = _model(ParallelDims.single(), 1)
    # Keep the idle peer's wait for the next command short (a collective times out at ~30 s).
    def setup():
        next_command(dims.pp, IDLE)
        return (model, 1), {}

    result = benchmark.pedantic(_step, setup=setup, rounds=5, warmup_rounds=1, iterations=1)
    print(f"\npp=1: loss {result.loss:.4f}")


def test_step_pp2_1f1b(benchmark, dims):
    model = _model(dims, 2)
    busy = []

    def step():
        result = _step(model, 2)
        busy.append(result.compute_seconds)
        return result

    def setup():
        next_command(dims.pp, STEP)

    result = benchmark.pedantic(step, setup=setup, rounds=5, warmup_rounds=1, iterations=1)
    theory = (2 - 1) / (M + 2 - 1)
    print(f"\npp=2: loss {result.loss:.4f}, theoretical bubble (p-1)/(m+p-1) = {theory:.3f}")
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    # Per timed round (the warmup round is busy[0]): bubble = idle share of rank 0's step.
    bubbles = [1 - b / t for b, t in zip(busy[1:], benchmark.stats.stats.data)]
    measured = sorted(bubbles)[len(bubbles) // 2]
    benchmark.extra_info.update(bubble_measured=round(measured, 3), bubble_theory=round(theory, 3))
    print(f"pp=2 step {benchmark.stats.stats.median:.3f} s (median), measured bubble of rank 0 "
          f"{measured:.3f} (median over rounds) vs theoretical (p-1)/(m+p-1) {theory:.3f}")


if __name__ == "__main__":
    from mcore.distributed_env import init_if_needed

    init_if_needed()
    if os.environ.get("MS_ROLE") == "MS_WORKER":
        _peer()
