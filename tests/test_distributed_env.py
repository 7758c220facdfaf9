"""``mcore.distributed_env``: the scheduler watchdog (single process: this test plays msrun,
``sleep`` processes play the worker and the scheduler) and the CPU start-up's eager-op setting."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from mcore.distributed_env import watch_scheduler
from tests.fresh_process import run_python

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


@pytest.mark.parametrize("env, inline", [(None, True), ("0", False)])
def test_cpu_start_up_runs_eager_ops_inline_unless_the_environment_says(env, inline):
    """``init_if_needed`` on the CPU (a fresh process: the setting is process-global) switches
    eager ops to the calling thread; a ``MS_DEV_LAUNCH_BLOCKING`` of the user's is left alone."""
    code = ("from mcore.distributed_env import init_if_needed; "
            "from mindspore._c_expression import RuntimeConf; "
            "assert init_if_needed() == (1, 0); "
            "print('INLINE', RuntimeConf.get_instance().is_launch_blocking())")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("MS_DEV_LAUNCH_BLOCKING", "MS_WORKER_NUM", "MS_ROLE")}
    if env is not None:
        environ["MS_DEV_LAUNCH_BLOCKING"] = env
    res = run_python(code, timeout=120, env=environ)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"INLINE {inline}" in res.stdout, res.stdout
