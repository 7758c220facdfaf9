"""The measurements the multi-rank harness uses to tell a slow rank from a stuck one."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.rank_activity import (MAX_SLOWDOWN, MIN_BUSY_CORES, RankActivity, busy_threshold,
                                 cpu_seconds, slowdown)

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


def test_slowdown_counts_only_load_beyond_the_cores_or_the_job():
    assert slowdown(load=1.5, ncpu=2, nranks=2) == 1.0
    assert slowdown(load=4.0, ncpu=2, nranks=4) == 1.0   # 4 ranks on 2 cores is the job itself
    assert slowdown(load=6.0, ncpu=2, nranks=2) == 3.0   # two ranks and four other processes
    assert slowdown(load=6.0, ncpu=2, nranks=4) == 1.5
    assert slowdown(load=100.0, ncpu=2, nranks=2) == MAX_SLOWDOWN


def test_busy_threshold_follows_the_share_a_process_can_get():
    assert busy_threshold(load=0.5, ncpu=2) == 0.25           # idle machine: a quarter core
    assert busy_threshold(load=8.0, ncpu=2) == pytest.approx(0.0625)
    assert busy_threshold(load=1000.0, ncpu=2) == MIN_BUSY_CORES
    assert busy_threshold(load=0.0, ncpu=2) == 0.25


def _sample_for(activity, seconds):
    end = time.time() + seconds
    while time.time() < end:
        activity.sample()
        time.sleep(0.25)


def test_a_computing_process_is_busy_and_a_sleeping_one_is_not():
    spin = subprocess.Popen([sys.executable, "-c", "while True: sum(range(10**6))"])
    nap = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        activity = RankActivity([spin.pid, nap.pid], window=3.0)
        assert activity.cores(0) is None  # no verdict before half a window of history
        _sample_for(activity, 3.5)
        assert activity.cores(0) > MIN_BUSY_CORES, activity.describe(0)
        assert activity.cores(1) < MIN_BUSY_CORES, activity.describe(1)
        assert activity.busy(load=os.getloadavg()[0]) == [0]
    finally:
        for p in (spin, nap):
            p.kill()
            p.wait()
    activity.sample()  # both reaped: no CPU history, so neither counts as busy any more
    assert activity.busy(load=0.0) == [] and cpu_seconds(spin.pid) is None
