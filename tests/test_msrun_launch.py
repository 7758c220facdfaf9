"""msrun is the launcher: single node, two "nodes" on loopback, a dying rank, and a rank whose
heartbeats stop for longer than MindSpore's default node timeout (30 s) without dying."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from mcore.distributed_env import SCHEDULER_GRACE_SECONDS
from tests.msrun_util import msrun_command, msrun_env, run_msrun, worker_logs
from tests.multirank import REPO_ROOT, free_port
from tests.tcp_forward import forward

pytestmark = pytest.mark.multirank

SCRIPT = str(REPO_ROOT / "tests" / "harness" / "allreduce_job.py")


def _ok_ranks(text: str) -> list[tuple[int, int]]:
    return sorted((int(r), int(w)) for r, w in re.findall(r"ALLREDUCE_OK rank=(\d+) world=(\d+)", text))


def test_single_node_msrun(tmp_path):
    res = run_msrun(msrun_command(SCRIPT, workers=2), cwd=tmp_path)
    logs = worker_logs(tmp_path / "logs")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + logs[-3000:]
    assert _ok_ranks(logs) == [(0, 2), (1, 2)]


def test_two_msrun_nodes_on_loopback_form_one_4_rank_job(tmp_path):
    """node_rank 0 is the master at 127.0.0.1; node_rank 1 reaches it as 127.0.0.2 (see
    tests/tcp_forward.py for why), exactly as a second machine would reach the master's IP."""
    port = free_port()
    relay = forward(("127.0.0.2", port), ("127.0.0.1", port))
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        cmd = msrun_command(SCRIPT, workers=4, local_workers=2, node_rank=node, port=port,
                            master_addr="127.0.0.1" if node == 0 else "127.0.0.2")
        procs.append(subprocess.Popen(["timeout", "-k", "5", "180"] + cmd, cwd=cwd, env=msrun_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    relay.shutdown()
    logs = [worker_logs(tmp_path / f"node{n}" / "logs") for n in (0, 1)]
    for node, p in enumerate(procs):
        assert p.returncode == 0, f"node {node}: {outs[node][-2000:]}\n{logs[node][-3000:]}"
    assert _ok_ranks(logs[0]) + _ok_ranks(logs[1]) == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert {r for r, _ in _ok_ranks(logs[0])} == {0, 1}  # node_rank 0 holds ranks 0 and 1


def test_a_dying_rank_ends_the_msrun_job_non_zero_in_bounded_time(tmp_path):
    start = time.time()
    res = run_msrun(msrun_command(SCRIPT, ["--die-rank", 1], workers=2), cwd=tmp_path, timeout=150)
    elapsed = time.time() - start
    assert res.returncode != 0
    assert res.returncode != 124, "msrun hung until the outer timeout"
    assert "rank 1 dies on purpose" in worker_logs(tmp_path / "logs")
    assert elapsed < 120


def test_a_killed_rank_ends_the_msrun_job_within_seconds(tmp_path):
    """msrun kills the other workers at once; the scheduler would then wait out MS_NODE_TIMEOUT
    (set long by mcore.distributed_env) but its watchdog ends it SCHEDULER_GRACE_SECONDS later."""
    res = run_msrun(msrun_command(SCRIPT, ["--kill-rank", 1], workers=2), cwd=tmp_path, timeout=200)
    ended = time.time()
    logs = worker_logs(tmp_path / "logs")
    assert res.returncode not in (0, 124), res.stdout[-2000:] + logs[-2000:]
    killed_at = float(re.search(r"KILLED_AT ([\d.]+)", logs).group(1))
    # From the death to the scheduler's exit (load ~12): 34 s with MindSpore's defaults, 117 s
    # with MS_NODE_TIMEOUT=120 alone, 11 s with the watchdog. To msrun's exit at load 21: 32 s.
    # Without the watchdog it would be at least NODE_TIMEOUT_SECONDS (180 s).
    assert ended - killed_at < SCHEDULER_GRACE_SECONDS + 50, ended - killed_at


def test_a_rank_frozen_longer_than_the_default_node_timeout_does_not_fail_the_job(tmp_path):
    """A worker that gets no CPU at all for 36 s (SIGSTOP) sends no heartbeat; with MindSpore's
    default MS_NODE_TIMEOUT (30 s; its monitor looks every 3 s) the scheduler declared it dead and msrun exited 1 after every
    rank had computed its result. ``init_if_needed`` sets a longer one, from the script itself
    (no msrun flag), so the job succeeds."""
    args = ["--freeze-rank", 1, "--freeze-seconds", 36]
    res = run_msrun(msrun_command(SCRIPT, args, workers=2), cwd=tmp_path, timeout=240)
    logs = worker_logs(tmp_path / "logs")
    assert res.returncode == 0, res.stdout[-2000:] + logs[-3000:]
    assert _ok_ranks(logs) == [(0, 2), (1, 2)]
