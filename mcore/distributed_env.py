"""Process start-up: pick the device and initialise MindSpore communication when launched on
several ranks (``msrun`` or the ``MS_ROLE`` / ``MS_WORKER_NUM`` environment recipe).

Heartbeats (measured on MindSpore 2.10, CPU). Every worker's C++ heartbeat thread reports to the
scheduler every 3 s; the scheduler ends the whole job once a worker has been silent for
``MS_NODE_TIMEOUT`` s (MindSpore's default 30). That thread keeps running while Python code or a
graph compile holds the GIL, but not while the process gets no CPU at all: a worker frozen for
60 s made a job that computed everything exit 1. ``init_if_needed`` therefore sets
``MS_NODE_TIMEOUT`` to ``NODE_TIMEOUT_SECONDS`` unless the user set it. It does so in every
process before ``init()``, the scheduler included: msrun starts the scheduler with the same
script, and the scheduler reads the variable in ``init()``.

A long node timeout would also be how long msrun waits after a rank dies (msrun kills the other
workers at once, then waits for the scheduler, which waits for the timeout). So the scheduler
that msrun started also starts a small watchdog process: once every worker msrun started has
exited, the scheduler gets ``SCHEDULER_GRACE_SECONDS`` to finish, then is ended (SIGTERM, then
SIGKILL), so msrun exits non-zero within seconds of a death instead of ``MS_NODE_TIMEOUT`` later.

Eager ops on the CPU. By default MindSpore queues each eager (PyNative) op for a runtime thread,
and a second thread spins while the caller waits for the queue or, inside an eager collective,
for a peer: two cores busy for one core of work. ``set_device("CPU")`` makes eager ops run in the
calling thread instead (``mindspore.runtime.launch_blocking``; measured on 2 cores: 400 small
eager matmuls 0.29 s instead of 1.8-6 s, a rank waiting 6 s at an eager all-reduce 0 CPU-s
instead of 6). It takes effect only before the process's first op, which is why it belongs to
start-up. ``MS_DEV_LAUNCH_BLOCKING`` in the environment (read at ``import mindspore``) wins.
Compiled graphs run as before.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

NODE_TIMEOUT_SECONDS = 180
SCHEDULER_GRACE_SECONDS = 10.0


def launched_world_size() -> int:
    """Number of ranks the launcher started (1 for a plain ``python`` process)."""
    return int(os.environ.get("MS_WORKER_NUM", "1"))


def requested_device() -> str:
    """The device this process runs on: the ``MSF_DEVICE`` env var, else CPU."""
    return os.environ.get("MSF_DEVICE", "CPU")


def set_device(device: str | None = None) -> str:
    """Select ``device`` (default: ``requested_device()``) and return its name. On the CPU, eager
    ops then run in the calling thread unless ``MS_DEV_LAUNCH_BLOCKING`` is set (module
    docstring)."""
    import mindspore as ms

    device = device or requested_device()
    ms.set_device(device)
    if device == "CPU" and "MS_DEV_LAUNCH_BLOCKING" not in os.environ:
        ms.runtime.launch_blocking()
    return device


def init_if_needed(device: str | None = None) -> tuple[int, int]:
    """Return ``(world_size, rank)``; call ``mindspore.communication.init()`` only if world > 1.

    Before ``init()``: sets the cluster timeouts of the module docstring (a user's own
    ``MS_NODE_TIMEOUT`` wins) and, in a scheduler started by msrun, starts the watchdog.
    Calling it twice is harmless: the second call returns the same numbers.
    """
    from mindspore.communication import get_group_size, get_rank, init
    from mindspore.communication.management import GlobalComm

    if not GlobalComm.INITED:
        set_device(device)
    if launched_world_size() <= 1 and os.environ.get("MS_ROLE") is None:
        return 1, 0
    if not GlobalComm.INITED:
        os.environ.setdefault("MS_NODE_TIMEOUT", str(NODE_TIMEOUT_SECONDS))
        if os.environ.get("MS_ROLE") == "MS_SCHED" and _launched_by_msrun():
            subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--watch-scheduler",
                              str(os.getpid()), str(os.getppid())], stdin=subprocess.DEVNULL)
        init()
    return get_group_size(), get_rank()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state letter, parent pid)`` of ``pid`` from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _launched_by_msrun() -> bool:
    """The parent process runs the ``msrun`` program (``python .../bin/msrun ...``)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(arg) == b"msrun" for arg in argv[:2])


def _live_children(parent: int, exclude: set[int]) -> list[int]:
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) not in exclude]
    return [p for p in pids if (st := _proc_stat(p)) and st[1] == parent and st[0] != "Z"]


def watch_scheduler(scheduler: int, launcher: int, grace: float = SCHEDULER_GRACE_SECONDS) -> None:
    """Until ``scheduler`` exits: once the launcher's other children (the workers) have all
    exited, give the scheduler ``grace`` seconds, then send it SIGTERM (SIGKILL 5 s later)."""
    seen_workers, all_gone_at = False, None
    while (st := _proc_stat(scheduler)) is not None and st[0] != "Z":
        if _live_children(launcher, exclude={scheduler}):
            seen_workers, all_gone_at = True, None
        elif seen_workers and all_gone_at is None:
            all_gone_at = time.time()
        if all_gone_at is not None and time.time() - all_gone_at > grace:
            print(f"distributed_env watchdog: every worker has exited but the scheduler still "
                  f"waits after {grace:.0f} s; ending it", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
                os.kill(scheduler, signal.SIGTERM)
                time.sleep(5.0)
                os.kill(scheduler, signal.SIGKILL)
            return
        time.sleep(1.0)


if __name__ == "__main__" and sys.argv[1:2] == ["--watch-scheduler"]:
    watch_scheduler(int(sys.argv[2]), int(sys.argv[3]))
