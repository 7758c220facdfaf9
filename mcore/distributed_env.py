"""Process start-up: pick the device and initialise MindSpore communication when launched on
several ranks (``msrun`` or the ``MS_ROLE`` / ``MS_WORKER_NUM`` environment recipe)."""
from __future__ import annotations

import os


def launched_world_size() -> int:
    """Number of ranks the launcher started (1 for a plain ``python`` process)."""
    return int(os.environ.get("MS_WORKER_NUM", "1"))


def requested_device() -> str:
    """The device this process runs on: the ``MSF_DEVICE`` env var, else CPU."""
    return os.environ.get("MSF_DEVICE", "CPU")


def set_device(device: str | None = None) -> str:
    """Select ``device`` (default: ``requested_device()``) and return its name."""
    import mindspore as ms

    device = device or requested_device()
    ms.set_device(device)
    return device


def init_if_needed(device: str | None = None) -> tuple[int, int]:
    """Return ``(world_size, rank)``; call ``mindspore.communication.init()`` only if world > 1.

    Calling it twice is harmless: the second call returns the same numbers.
    """
    from mindspore.communication import get_group_size, get_rank, init
    from mindspore.communication.management import GlobalComm

    if not GlobalComm.INITED:
        set_device(device)
    if launched_world_size() <= 1 and os.environ.get("MS_ROLE") is None:
        return 1, 0
    if not GlobalComm.INITED:
        init()
    return get_group_size(), get_rank()
