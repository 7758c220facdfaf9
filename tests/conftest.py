"""Session set-up shared by every test.

MindSpore's cluster heartbeat: each worker reports to the scheduler every
``MS_RETRY_INTERVAL_LOWER``..``MS_RETRY_INTERVAL_UPPER`` s (a random whole number, 3..5 by
default). A worker learns from a beat's reply that every rank has registered, so ``init()``
returns up to one interval after the last rank arrives, and at exit it waits for its heartbeat
thread to finish the current interval. One second makes every multi-rank job start and end a
few seconds sooner (measured: a two-rank msrun all-reduce job, 24 s -> 18 s at load 25 on 2
cores). It changes no timeout: a rank is still declared dead after ``MS_NODE_TIMEOUT`` s of
silence. Set here, before any process is started, so msrun, the ``tests.multirank`` harness
and the docs' commands inherit it; a value already in the environment wins.

Eager ops: ``MS_DEV_LAUNCH_BLOCKING=1`` (read at ``import mindspore``) runs each one in the
calling thread instead of queueing it for a runtime thread while another spins, as the library
does at CPU start-up (``mcore.distributed_env.set_device``; why and what it saves:
``docs/performance.md``, "Eager ops on the CPU"). The variable also covers the tests that run
eager ops in-process without that start-up. Measured: the whole suite 1284 s instead of
1679-1773 s (2196 CPU-s instead of 2900).

The working directories of ``tests.multirank`` jobs (logs, results, MindSpore's ``rank_N/``) go
under pytest's base temporary directory (``MSF_RANK_JOB_ROOT``), which pytest prunes to the
last three runs, instead of piling up in the system's temporary directory.
"""
import os

import pytest


def pytest_configure(config):
    os.environ.setdefault("MS_DEV_LAUNCH_BLOCKING", "1")
    os.environ.setdefault("MS_RETRY_INTERVAL_LOWER", "1")
    os.environ.setdefault("MS_RETRY_INTERVAL_UPPER", "1")


@pytest.fixture(scope="session", autouse=True)
def rank_job_root(tmp_path_factory):
    """Where this session's multi-rank jobs keep their working directories."""
    root = tmp_path_factory.mktemp("rank_jobs")
    os.environ["MSF_RANK_JOB_ROOT"] = str(root)
    return root
