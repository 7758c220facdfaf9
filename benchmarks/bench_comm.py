"""Cost of the portable collectives: 2 ranks, 1 MiB float32 per rank, bytes/s printed.

This pytest process is rank 0 of a real 2-rank MindSpore job (rank 1 and the scheduler are
subprocesses); pytest-benchmark times each collective call on rank 0. The reference is the SUM
all-reduce of the same 1 MiB, the one collective with a CPU kernel that the others are composed
from: each row prints its time relative to it. Run alone (it initialises communication in this
process)::

    .venv/bin/python -m pytest benchmarks/bench_comm.py --benchmark-enable
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.comm_ops import PAYLOAD_FLOATS, STOP, next_command, ops_table, payload
from tests.multirank import REPO_ROOT, free_port, rank_env

NAMES = [name for name, _ in ops_table()]


@pytest.fixture(scope="module")
def world():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "benchmarks/comm_peer.py"], cwd=REPO_ROOT,
                              env=rank_env(2, port, role, rank))
             for role, rank in (("MS_SCHED", None), ("MS_WORKER", 1))]
    os.environ.update({k: v for k, v in rank_env(2, port, "MS_WORKER", 0).items()
                       if k.startswith("MS_")})
    from mcore.parallel_state import ParallelDims

    group = ParallelDims.build().world
    yield group
    next_command(group, STOP)
    procs[1].wait(timeout=60)  # the scheduler exits once this process (rank 0) exits


@pytest.fixture(scope="module")
def reference_seconds():
    return {}


@pytest.mark.parametrize("name", NAMES)
def test_collective_1mib(benchmark, world, reference_seconds, name):
    op_id = NAMES.index(name)
    fn = dict(ops_table())[name]
    x = payload(world.rank)

    def setup():
        next_command(world, float(op_id))

    def call():
        fn(x, world).asnumpy()

    benchmark.pedantic(call, setup=setup, rounds=20, warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
        return
    seconds = benchmark.stats.stats.median
    reference_seconds.setdefault("all_reduce", seconds)
    mib_per_s = PAYLOAD_FLOATS * 4 / seconds / 2**20
    ratio = seconds / reference_seconds["all_reduce"]
    benchmark.extra_info.update(mib_per_s=round(mib_per_s, 1), vs_all_reduce=round(ratio, 2))
    print(f"\n{name:>15}: {seconds * 1e3:7.2f} ms  {mib_per_s:8.1f} MiB/s  "
          f"{ratio:4.2f}x the all_reduce reference")
