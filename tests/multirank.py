"""Run a test body on N real MindSpore ranks and bring back each rank's checks and results.

A *worker* is a function ``worker(ctx)`` in an importable module (``"tests.mcore.test_comm:
_worker"``). ``run_ranks`` starts one scheduler and N worker processes with MindSpore's
documented environment recipe (``MS_ROLE``, ``MS_WORKER_NUM``, ``MS_SCHED_HOST/PORT``,
``MS_NODE_ID`` -> rank), each in a private temporary directory (MindSpore writes ``rank_N/``
into the cwd; it is also the workers' ``TMPDIR``, so what they write with ``tempfile`` stays
with the job). The job directories go under ``$MSF_RANK_JOB_ROOT`` when it is set
(``tests/conftest.py`` points it into pytest's base temporary directory). It watches them:

- every rank exits 0 -> a ``RankJob`` with each rank's checks, reported values and log path;
- a rank that finished its body (its result is saved, no exception) and THEN dies of a signal
  while the interpreter shuts down counts as finished: MindSpore 2.10 occasionally segfaults in
  its exit handlers on CPU (seen in 2 of roughly 80 CI launches, after every check passed). The
  signal is kept in ``RankJob.teardown_signals`` and printed as a warning, never hidden;
- a rank exits non-zero -> the others get a short grace period, are killed, and ``RankFailure``
  names the rank that failed FIRST and carries its traceback;
- the ranks do not all finish ``init()`` within ``init_timeout`` s, or afterwards the job makes
  no progress for ``stall_timeout`` s, or the job exceeds ``timeout`` s -> every process is
  killed and ``RankFailure`` says which ranks were still running, where each one is (its
  heartbeat, see ``tests.rank_worker``), how much CPU it used, and its log tail.

Slow is not stuck. Progress is a check starting or ending, a log line, OR a rank that is busy
computing: it used a fair part of the CPU it could get over the last 10 s
(``tests.rank_activity``; a long graph compile counts, ``time.sleep`` or a wait on a lock does
not). All three limits are in idle-machine seconds: the clock that measures them runs slower
while the load average says the machine is oversubscribed (at most 8x), so a loaded machine
stretches them instead of failing the job. A rank that dies is caught at once (its exit code),
a rank that sleeps or waits forever after ``stall_timeout``, and a rank that spins forever
without finishing by the stretched ``timeout``.

Inside a worker, ``with ctx.check("name"):`` records one named check: an ``AssertionError``
marks it failed and the worker goes on (so one launch reports many checks); any other exception
is recorded and re-raised, ending the rank with a non-zero code (communication state may be
broken). ``ctx.report(key, value)`` returns a picklable value to the test.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.rank_activity import RankActivity, load_average, slowdown

REPO_ROOT = Path(__file__).resolve().parent.parent
GRACE_SECONDS = 5.0
LOAD_EVERY = 2.0  # seconds between load-average / CPU samples


class RankFailure(AssertionError):
    """A multi-rank job failed, hung or timed out; the message names the rank and its error.

    ``rank``: the rank that failed first (None for a hang / timeout); ``failed_at`` and
    ``ended_at``: seconds from launch to that failure and to the end of the job.
    """

    def __init__(self, message: str, rank: int | None = None, failed_at: float | None = None,
                 ended_at: float | None = None):
        super().__init__(message)
        self.rank, self.failed_at, self.ended_at = rank, failed_at, ended_at


@dataclass
class RankJob:
    """What a finished job brought back: per rank, its checks and reported values."""

    nranks: int
    checks: list = field(default_factory=list)  # per rank: {name: error text or None}
    values: list = field(default_factory=list)  # per rank: {key: value}
    logs: list = field(default_factory=list)  # per rank: log path
    seconds: float = 0.0
    teardown_signals: dict = field(default_factory=dict)  # rank -> exit code after its body

    def names(self, prefix: str = "") -> list[str]:
        return sorted({n for c in self.checks for n in c if n.startswith(prefix)})

    def assert_ok(self, prefix: str) -> None:
        """Every check whose name starts with ``prefix`` passed on every rank (and one exists)."""
        names = self.names(prefix)
        if not names:
            raise AssertionError(f"no check named {prefix}* ran (ran: {self.names()})")
        errors = []
        for name in names:
            for rank, checks in enumerate(self.checks):
                if name not in checks:
                    errors.append(f"[rank {rank}] {name}: did not run")
                elif checks[name] is not None:
                    errors.append(f"[rank {rank}] {name}: {checks[name]}")
        if errors:
            raise AssertionError("\n".join(errors))

    def value(self, key: str, rank: int = 0):
        return self.values[rank][key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(nranks: int, port: int, role: str, rank: int | None = None) -> dict:
    """Environment for one process of a local job (the documented MindSpore recipe)."""
    env = dict(os.environ)
    env.update(MS_WORKER_NUM=str(nranks), MS_SCHED_HOST="127.0.0.1", MS_SCHED_PORT=str(port),
               MS_ROLE=role, GLOG_v=env.get("GLOG_v", "3"),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    if rank is not None:
        env["MS_NODE_ID"] = str(rank)
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _progress_stamp(paths) -> float:
    stamps = [p.stat().st_mtime for p in paths if p.exists()]
    return max(stamps) if stamps else 0.0


def run_ranks(nranks: int, target: str, args: tuple = (), timeout: float = 300.0,
              stall_timeout: float = 45.0, init_timeout: float = 120.0,
              env: dict | None = None) -> RankJob:
    """Run ``target`` (``"module:function"``) on ``nranks`` ranks; see the module docstring."""
    workdir = Path(tempfile.mkdtemp(prefix=f"msf_{nranks}ranks_",
                                    dir=os.environ.get("MSF_RANK_JOB_ROOT")))
    port = free_port()
    runner = [sys.executable, "-m", "tests.rank_worker"]
    procs, logs = [], []
    sched_log = workdir / "scheduler.log"
    with open(sched_log, "w") as f:
        procs.append(subprocess.Popen(runner + ["--scheduler"], cwd=workdir, stdout=f,
                                      stderr=subprocess.STDOUT,
                                      env={**rank_env(nranks, port, "MS_SCHED"), **(env or {})}))
    for rank in range(nranks):
        log = workdir / f"worker_{rank}.log"
        logs.append(log)
        with open(log, "w") as f:
            cmd = runner + [target, str(workdir), *map(str, args)]
            procs.append(subprocess.Popen(cmd, cwd=workdir, stdout=f, stderr=subprocess.STDOUT,
                                          env={**rank_env(nranks, port, "MS_WORKER", rank),
                                               "TMPDIR": str(workdir), **(env or {})}))
    workers = procs[1:]
    ticks = [workdir / f"progress_{r}" for r in range(nranks)]
    progress = ticks + logs
    activity = RankActivity([p.pid for p in workers])
    ncpu = os.cpu_count() or 1
    initialised = False
    start = last_sample = last_tick = time.time()
    elapsed = idle = 0.0  # idle-machine seconds since launch / since the last progress
    last_stamp, load, stretch, busy = 0.0, 0.0, 1.0, []
    first_failure = None
    teardown: dict[int, int] = {}  # rank -> signal exit after a complete, successful body
    while True:
        now = time.time()
        codes = [p.poll() for p in workers]
        for rank, code in enumerate(codes):
            if code is not None and code < 0 and rank not in teardown and \
                    _finished_body(workdir, rank):
                teardown[rank] = code
            if code not in (None, 0) and rank not in teardown and first_failure is None:
                first_failure = (rank, code, now)
        if all(c is not None for c in codes):
            break
        if first_failure and now - first_failure[2] > GRACE_SECONDS:
            break
        if now - last_sample >= LOAD_EVERY:
            activity.sample(now)
            load = load_average()
            stretch, busy = slowdown(load, ncpu, nranks), activity.busy(load)
            last_sample = now
        dt, last_tick = (now - last_tick) / stretch, now
        elapsed += dt
        idle += dt
        if not initialised and all(t.exists() for t in ticks):
            initialised, idle = True, 0.0
        stamp = _progress_stamp(progress)
        if stamp != last_stamp or busy:
            last_stamp, idle = stamp, 0.0
        stalled = initialised and idle > stall_timeout
        slow_init = not initialised and elapsed > init_timeout
        if elapsed > timeout or stalled or slow_init:
            running = [r for r, c in enumerate(codes) if c is None]
            _kill(procs)
            why = ("timed out" if elapsed > timeout else
                   f"made no progress for {stall_timeout:.0f} s" if stalled else
                   f"did not finish init() within {init_timeout:.0f} s")
            details = "\n".join(f"--- rank {r} ({activity.describe(r)}; "
                                f"{_heartbeat(workdir, r, now)}) log tail ({logs[r]}):\n"
                                f"{_tail(logs[r])}" for r in running)
            busy_body = [r for r in running if not (workdir / f"result_{r}.pkl").exists()]
            raise RankFailure(f"{nranks}-rank job {target} {why} after {now - start:.0f} s "
                              f"(load {load:.1f} on {ncpu} cores: limits stretched "
                              f"x{stretch:.1f}); "
                              f"ranks still running: {running} (inside the test body: {busy_body})"
                              f"\n{details}")
        time.sleep(0.1)
    _kill(procs)
    if first_failure is not None:
        rank, code, when = first_failure
        result = _load_result(workdir, rank)
        trace = result.get("traceback") or _tail(logs[rank])
        raise RankFailure(f"rank {rank} of {nranks} failed first (exit code {code}, "
                          f"{when - start:.1f} s into {target}); log {logs[rank]}\n{trace}",
                          rank=rank, failed_at=when - start, ended_at=time.time() - start)
    job = RankJob(nranks=nranks, logs=logs, seconds=time.time() - start, teardown_signals=teardown)
    for rank, code in teardown.items():
        print(f"warning: rank {rank} of {target} exited {code} during interpreter shutdown, after "
              f"its body completed; log {logs[rank]}", file=sys.stderr, flush=True)
    for rank in range(nranks):
        result = _load_result(workdir, rank)
        if "checks" not in result:
            raise RankFailure(f"rank {rank} exited 0 without writing its result; log {logs[rank]}\n"
                              f"{_tail(logs[rank])}")
        job.checks.append(result["checks"])
        job.values.append(result["values"])
    return job


def _heartbeat(workdir: Path, rank: int, now: float) -> str:
    """Where rank ``rank``'s main thread was at its last heartbeat, and how long ago."""
    try:
        stamp, where = (workdir / f"heartbeat_{rank}").read_text().split(" ", 1)
    except (OSError, ValueError):
        return "no heartbeat"
    return f"heartbeat {now - float(stamp):.0f} s ago at {where}"


def _finished_body(workdir: Path, rank: int) -> bool:
    """The rank saved its result and its body raised nothing (``tests.rank_worker`` saves it
    only after the body returned, just before the interpreter exits)."""
    try:
        result = _load_result(workdir, rank)
    except (OSError, EOFError, pickle.UnpicklingError):
        return False
    return "checks" in result and result.get("traceback") is None


def _load_result(workdir: Path, rank: int) -> dict:
    path = workdir / f"result_{rank}.pkl"
    if not path.exists():
        return {}
    with open(path, "rb") as f:
        return pickle.load(f)
