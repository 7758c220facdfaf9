"""Session set-up shared by every test.

MindSpore's cluster heartbeat: each worker reports to the scheduler every
``MS_RETRY_INTERVAL_LOWER``..``MS_RETRY_INTERVAL_UPPER`` s (default 3..5, a random whole
number) and learns from the reply that every rank has registered, so ``init()`` waits up to one
interval after the last rank arrives. One second makes every multi-rank launch start (and fail)
a few seconds sooner; the variables are set here, before any process is started, so msrun, the
``tests.multirank`` harness and the docs' commands inherit them (a value already in the
environment wins).
"""
import os


def pytest_configure(config):
    os.environ.setdefault("MS_RETRY_INTERVAL_LOWER", "1")
    os.environ.setdefault("MS_RETRY_INTERVAL_UPPER", "1")
