"""The scheduler watchdog of ``mcore.distributed_env`` (single process: this test plays msrun,
``sleep`` processes play the worker and the scheduler)."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from mcore.distributed_env import watch_scheduler

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


def _watch(scheduler, grace):
    thread = threading.Thread(target=watch_scheduler, args=(scheduler.pid, os.getpid(), grace),
                              daemon=True)
    thread.start()
    return thread


def test_scheduler_is_ended_grace_seconds_after_the_last_worker_exits():
    worker = subprocess.Popen(["sleep", "2"])
    scheduler = subprocess.Popen(["sleep", "120"])
    start = time.time()
    _watch(scheduler, grace=2)
    try:
        assert scheduler.wait(timeout=30) == -15  # SIGTERM
    finally:
        scheduler.kill()
        worker.wait()
    assert 4 <= time.time() - start < 15  # worker 2 s + grace 2 s, polled every second


def test_scheduler_that_finishes_on_its_own_is_left_alone():
    worker = subprocess.Popen(["sleep", "1"])
    scheduler = subprocess.Popen(["sh", "-c", "sleep 2; exit 0"])
    thread = _watch(scheduler, grace=5)
    assert scheduler.wait(timeout=30) == 0
    worker.wait()
    thread.join(timeout=5)
    assert not thread.is_alive()  # the watchdog returns once the scheduler is gone
