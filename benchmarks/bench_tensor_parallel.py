"""Forward+backward of a Column -> Row MLP block: one process vs tp=1 and tp=2 on 2 ranks.

Run: ``.venv/bin/python -m pytest benchmarks/bench_tensor_parallel.py --benchmark-enable -s``

pytest-benchmark times the single-process block (jit-compiled step). Then one 2-rank job
times, inside each rank (median of ``ITERS`` steps, ranks in lock-step behind a barrier):

- ``tp1_2ranks``: every rank runs the whole block on its own (no communication): what two
  data-parallel replicas pay on the shared cores;
- ``tp2``: the block split over 2 ranks (one all-reduce forward, one backward);
- ``tp2_sp``: the same with sequence parallelism (all-gather in, reduce-scatter out).

``tp2 - tp1_2ranks / 2`` is roughly the communication cost. The table is printed and stored
in ``extra_info`` of the benchmark record; gated (``benchmarks/gate.py``):
``tensor_parallel.tp2_speedup`` (single-process time / tp2 time, higher is better).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.gate import gate_value

B, S, H, F = 4, 256, 512, 2048
ITERS, WARMUP = 10, 2


def _step(group, sp: bool = False):
    """A compiled fwd+bwd of sum(MLP(x) * w) and its inputs (local shards with ``sp``)."""
    import mindspore as ms

    from mcore.tensor_parallel import shard
    from tests.mcore.tp_reference import build_mlp, data
    from tests.ms_helpers import WeightedSum

    net = build_mlp(H, F, group, sp)
    x, w = data((B, S, H), 1), data((B, S, H), 2)
    if sp:
        x, w = (shard(a, group.size, group.rank, 1) for a in (x, w))
    obj = WeightedSum(net)
    fn = ms.jit(ms.value_and_grad(obj, grad_position=0, weights=net.trainable_params()))
    args = (ms.Tensor(x), ms.Tensor(w))

    def run():
        loss, (dx, _) = fn(*args)
        return dx.asnumpy()  # wait for the result

    return run


def _median_ms(run, barrier) -> float:
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(ITERS):
        barrier()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _worker(ctx):
    from mcore import comm
    from mcore.parallel_state import ParallelDims, ProcessGroup

    dims = ParallelDims.build(tp=2)
    cases = {"tp1_2ranks": (ProcessGroup.single("tp"), False), "tp2": (dims.tp, False),
             "tp2_sp": (dims.tp, True)}
    for name, (group, sp) in cases.items():
        with ctx.check(name):
            ms_per_step = _median_ms(_step(group, sp), lambda: comm.barrier(dims.world))
            ctx.report(name, ms_per_step)


def test_column_row_mlp_fwd_bwd(benchmark):
    ms = pytest.importorskip("mindspore")
    ms.set_device("CPU")
    from mcore.parallel_state import ProcessGroup
    from tests.multirank import run_ranks

    benchmark.pedantic(_step(ProcessGroup.single("tp")), rounds=ITERS, warmup_rounds=WARMUP)
    single = benchmark.stats.stats.median * 1e3 if benchmark.stats else float("nan")
    job = run_ranks(2, "benchmarks.bench_tensor_parallel:_worker", timeout=400, stall_timeout=120)
    job.assert_ok("tp")
    rows = {"single process": single}
    for name in ("tp1_2ranks", "tp2", "tp2_sp"):
        rows[name] = max(job.value(name, r) for r in range(2))  # the slower rank sets the pace
    benchmark.extra_info.update({k: round(v, 2) for k, v in rows.items()})
    gate_value(benchmark, "tensor_parallel.tp2_speedup", rows["single process"] / rows["tp2"])
    print(f"\nColumn->Row MLP fwd+bwd, b={B} s={S} h={H} ffn={F}, fp32, median ms per step:")
    for name, ms_per_step in rows.items():
        print(f"  {name:<16} {ms_per_step:8.1f}")
