"""The one dispatch between native collectives and compositions from a SUM all-reduce.

On CPU, MindSpore 2.10 has kernels for ``AllReduce(SUM)`` on any group (PyNative and jit), but
none for ReduceScatter / AlltoAll / Send / Receive, and AllGather / Broadcast only on the world
group. So on CPU every collective is composed from a SUM all-reduce (exact: the extra operands
are zeros). On Ascend and GPU the native kernels are used. Set ``MSF_COMM=composed`` to force
the compositions on any device (useful to compare both paths on a device that has kernels).
"""
from __future__ import annotations

import os

import mindspore as ms

NATIVE_DEVICES = ("Ascend", "GPU")


def use_native() -> bool:
    """True when the current device has native kernels for every collective on sub-groups."""
    if os.environ.get("MSF_COMM", "auto") == "composed":
        return False
    return ms.get_context("device_target") in NATIVE_DEVICES
