"""msrun is the launcher: single node, two "nodes" on loopback, and a dying rank."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

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
