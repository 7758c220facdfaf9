"""Tell a slow rank from a stuck one, for ``tests.multirank.run_ranks``.

Two measurements, both taken from outside the rank processes (so they work while a rank's C
code holds the GIL, e.g. during a long MindSpore graph compile):

- ``cpu_seconds(pid)``: CPU time of a process, all threads, from ``/proc/<pid>/stat``. A rank
  that computes (compiles, runs kernels) keeps consuming CPU however loaded the machine is; a
  rank that waits in ``time.sleep``, on a lock or on a peer that never comes uses (almost) none.
  Measured on the 2-core box: a sleeping rank 0.00 core, a rank blocked in an all-reduce whose
  peer never arrives 0.04-0.10 core (MindSpore ends that wait itself after ~30 s), computing
  ranks 0.15-1.0 core depending on load.
- ``slowdown(load, ncpu, nranks)``: how much slower than an idle machine the job runs now, from
  the 1-minute load average. Timeouts given in "idle-machine seconds" are stretched by it.

``RankActivity`` keeps a short history of each rank's CPU time and says which ranks are busy.
"""
from __future__ import annotations

import os
import time
from collections import deque

BUSY_WINDOW = 10.0  # seconds of history behind a busy / idle verdict
BUSY_FRACTION = 0.25  # busy: at least this fraction of the CPU share the rank could get
MIN_BUSY_CORES = 0.02  # never call a rank busy below this many cores
MAX_SLOWDOWN = 8.0  # timeouts stretch at most this much (a 2-core box shared by 6 saw load 22)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of ``pid`` in seconds; None if it is gone or the
    system has no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def slowdown(load: float, ncpu: int, nranks: int) -> float:
    """How many times slower than on an idle machine a job of ``nranks`` processes runs when the
    1-minute load average is ``load`` (which counts the job's own ranks): 1 while the load is
    at most max(ncpu, nranks), proportional above, capped at ``MAX_SLOWDOWN``."""
    return min(MAX_SLOWDOWN, max(1.0, load / max(ncpu, nranks, 1)))


def busy_threshold(load: float, ncpu: int) -> float:
    """Cores a rank must use to count as busy: ``BUSY_FRACTION`` of the share of a core one
    runnable process gets at this load (``ncpu / load``, at most 1), never below
    ``MIN_BUSY_CORES``."""
    share = min(1.0, ncpu / load) if load > 0 else 1.0
    return max(MIN_BUSY_CORES, BUSY_FRACTION * share)


class RankActivity:
    """CPU history of the rank processes ``pids`` (index = rank)."""

    def __init__(self, pids: list[int], window: float = BUSY_WINDOW):
        self.pids, self.window = pids, window
        self.history: list[deque] = [deque() for _ in pids]  # per rank: (time, cpu seconds)
        self.ncpu = os.cpu_count() or 1

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for pid, hist in zip(self.pids, self.history):
            cpu = cpu_seconds(pid)
            if cpu is None:  # exited and reaped: no longer busy
                hist.clear()
                continue
            hist.append((now, cpu))
            while len(hist) > 2 and now - hist[1][0] >= self.window:
                hist.popleft()

    def cores(self, rank: int) -> float | None:
        """Cores rank ``rank`` used over the last window (None before one window has passed)."""
        hist = self.history[rank]
        if len(hist) < 2 or hist[-1][0] - hist[0][0] < self.window / 2:
            return None
        (t0, c0), (t1, c1) = hist[0], hist[-1]
        return (c1 - c0) / (t1 - t0)

    def busy(self, load: float) -> list[int]:
        """Ranks that used at least ``busy_threshold(load)`` cores over the last window."""
        limit = busy_threshold(load, self.ncpu)
        return [r for r in range(len(self.pids)) if (self.cores(r) or 0.0) >= limit]

    def describe(self, rank: int) -> str:
        cores = self.cores(rank)
        return "cpu ?" if cores is None else f"{cores:.2f} cores over the last {self.window:.0f} s"
