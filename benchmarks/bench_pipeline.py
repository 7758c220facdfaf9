"""Pipeline step time: pp=2 (1F1B, 2 ranks) vs pp=1 (one process), 8 micro-batches.

The model is the tiny stack of ``tests/mcore/pipeline/tiny_stack.py`` at a size where compute
dominates (8 residual blocks, hidden 512, vocab 2048, micro-batch 4 x 64 tokens), split 5 + 3
so that the two stages cost about the same (stage 1 also runs the output layer and the loss).

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

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.comm_ops import next_command  # noqa: E402
from tests.multirank import REPO_ROOT, free_port, rank_env  # noqa: E402

M, MBS, SEQ, HIDDEN, VOCAB, LAYERS, SPLIT = 8, 4, 64, 512, 2048, 8, [5, 3]
STEP, IDLE, STOP = 1.0, 2.0, -1.0


def _model(dims, pp):
    from mcore.pipeline_parallel.stage import build_pipeline_model
    from tests.mcore.pipeline import tiny_stack as T

    embed, blocks, head = T.make_cells(LAYERS, HIDDEN, VOCAB, scale=0.05)
    return build_pipeline_model(embed, blocks, head, T.CrossEntropy(), dims, HIDDEN,
                                layers_per_stage=SPLIT if pp == 2 else None, time_actions=True)


def _step(model, pp):
    from mcore.pipeline_parallel.schedules import get_forward_backward_func
    from tests.mcore.pipeline import tiny_stack as T

    micro = T.batches(0, M, MBS, SEQ, VOCAB)
    return get_forward_backward_func(pp)(T.forward_step, iter(micro), model, M, SEQ, MBS)


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
