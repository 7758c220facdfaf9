"""Build and run ``msrun`` command lines for tests (always with a cluster timeout and an outer
``timeout``, so a rank that dies before ``init()`` cannot hang the test for 600 s)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.multirank import REPO_ROOT, free_port


def msrun_command(script: str, args=(), workers: int = 2, local_workers: int | None = None,
                  node_rank: int | None = None, port: int | None = None, log_dir: str = "logs",
                  cluster_time_out: int = 60, master_addr: str = "127.0.0.1") -> list[str]:
    msrun = shutil.which("msrun", path=str(Path(sys.executable).parent)) or "msrun"
    cmd = [msrun, f"--worker_num={workers}", f"--local_worker_num={local_workers or workers}",
           f"--master_addr={master_addr}", f"--master_port={port or free_port()}",
           f"--log_dir={log_dir}", "--join=True", f"--cluster_time_out={cluster_time_out}"]
    if node_rank is not None:
        cmd.append(f"--node_rank={node_rank}")
    return cmd + [script, *map(str, args)]


def msrun_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    # msrun starts workers with the `python` on PATH: make it this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("GLOG_v", "3")
    return env


def run_msrun(cmd: list[str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "-k", "5", str(int(timeout))] + cmd, cwd=cwd, env=msrun_env(),
                          capture_output=True, text=True)


def worker_logs(log_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("worker_*.log")))
