"""The multi-rank harness itself: results come back, failures name the first failing rank,
hangs end within the stall timeout instead of waiting for MindSpore's own timeouts, and a rank
that computes for longer than the stall timeout (a long compile) is not taken for a hang."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from tests.multirank import RankFailure, run_ranks

pytestmark = pytest.mark.multirank


def _sum_worker(ctx):
    import mindspore as ms
    import numpy as np

    from mcore import comm
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build()
    with ctx.check("world_size"):
        assert dims.world_size == ctx.world == 2
    with ctx.check("all_reduce"):
        got = comm.all_reduce(ms.Tensor(np.array([ctx.rank + 1.0], np.float32)), dims.world)
        assert float(got.asnumpy()[0]) == 3.0
    with ctx.check("deliberately_failing"):
        assert ctx.rank == 0, f"rank {ctx.rank} is not 0"
    ctx.report("rank_seen", ctx.rank)
    ctx.report("tempdir", tempfile.gettempdir())


def _raise_on_rank1_worker(ctx):
    import mindspore as ms
    import numpy as np

    from mcore import comm
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build()
    if ctx.rank == 1:
        raise RuntimeError("boom on rank 1")
    comm.all_reduce(ms.Tensor(np.ones(1, np.float32)), dims.world).asnumpy()  # waits for rank 1


def _segfault_worker(ctx):
    """Rank 1 dies of SIGSEGV: inside its body (arg "body") or at interpreter exit ("exit")."""
    import atexit
    import signal

    with ctx.check("body_ran"):
        assert ctx.world == 2
    if ctx.rank == 1:
        if ctx.args == ["body"]:
            os.kill(os.getpid(), signal.SIGSEGV)
        atexit.register(os.kill, os.getpid(), signal.SIGSEGV)


def _stall_worker(ctx):
    if ctx.rank == 0:
        time.sleep(300)


def _long_compute_worker(ctx):
    """Every rank computes, silently, for ``ctx.args[0]`` CPU-seconds in C calls that hold the
    GIL (as a graph compile does), then all ranks meet in an all-reduce."""
    import mindspore as ms
    import numpy as np

    from mcore import comm
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build()
    start, cpu = time.time(), time.thread_time()
    while time.thread_time() - cpu < float(ctx.args[0]):
        sum(range(5_000_000))
    ctx.report("silent_seconds", time.time() - start)
    with ctx.check("all_reduce_after_compute"):
        got = comm.all_reduce(ms.Tensor(np.ones(1, np.float32)), dims.world)
        assert float(got.asnumpy()[0]) == 2.0


def test_results_and_checks_come_back_per_rank():
    job = run_ranks(2, "tests.test_multirank_harness:_sum_worker", timeout=120)
    job.assert_ok("world_size")
    job.assert_ok("all_reduce")
    assert [job.value("rank_seen", r) for r in range(2)] == [0, 1]
    # a rank's temporary files stay in its job's directory, under pytest's base temp dir
    workdir = Path(job.logs[0]).parent
    assert workdir.parent == Path(os.environ["MSF_RANK_JOB_ROOT"]), workdir
    assert [job.value("tempdir", r) for r in range(2)] == [str(workdir)] * 2
    with pytest.raises(AssertionError, match=r"\[rank 1\] deliberately_failing: .*rank 1 is not 0"):
        job.assert_ok("deliberately_failing")
    with pytest.raises(AssertionError, match="no check named missing"):
        job.assert_ok("missing")


# The peers of a failed rank are stopped after GRACE_SECONDS (5 s); allow for a loaded machine.
PROMPT_SECONDS = 15


def test_rank_raising_after_init_is_reported_first_and_fast():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 of 2 failed first.*boom on rank 1") as err:
        run_ranks(2, "tests.test_multirank_harness:_raise_on_rank1_worker", timeout=120)
    assert err.value.rank == 1
    # Rank 0 is blocked in an all-reduce that would only time out after ~30 s on its own.
    assert err.value.ended_at - err.value.failed_at < PROMPT_SECONDS


def test_rank_dying_before_init_is_reported_first_and_fast():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 of 2 failed first.*died before init") as err:
        run_ranks(2, "tests.harness.die_on_import:worker", timeout=120)
    assert err.value.rank == 1
    # Rank 0 is blocked in init(), which would otherwise wait for its cluster timeout.
    assert err.value.ended_at - err.value.failed_at < PROMPT_SECONDS


def test_a_hang_ends_at_the_stall_timeout():
    start = time.time()
    with pytest.raises(RankFailure, match=r"made no progress for 8 s.*inside the test body: \[0\]"):
        run_ranks(2, "tests.test_multirank_harness:_stall_worker", timeout=120, stall_timeout=8)
    assert time.time() - start < 240  # the worker would sleep for 300 s (8 s stretch to <= 64 s)


def test_a_rank_computing_longer_than_the_stall_timeout_is_not_a_hang():
    job = run_ranks(2, "tests.test_multirank_harness:_long_compute_worker", args=(12,),
                    timeout=150, stall_timeout=6)
    job.assert_ok("all_reduce_after_compute")
    # Both ranks were silent (no check, no log line) for twice the stall timeout or more.
    assert min(job.value("silent_seconds", r) for r in range(2)) > 2 * 6


def test_segfault_at_exit_after_a_complete_body_is_reported_not_failed():
    job = run_ranks(2, "tests.test_multirank_harness:_segfault_worker", args=("exit",), timeout=120)
    job.assert_ok("body_ran")
    assert job.teardown_signals == {1: -11}


def test_segfault_inside_the_body_fails_the_job():
    with pytest.raises(RankFailure, match=r"rank 1 of 2 failed first \(exit code -11"):
        run_ranks(2, "tests.test_multirank_harness:_segfault_worker", args=("body",), timeout=120)
