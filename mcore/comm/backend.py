"""The one dispatch between native collectives and compositions from a SUM all-reduce.

On CPU, MindSpore 2.10 has kernels for ``AllReduce(SUM)`` on any group (PyNative and jit), but
none for ReduceScatter / AlltoAll / Send / Receive, and AllGather / Broadcast only on the world
group. So on CPU every collective is composed from a SUM all-reduce (exact: the extra operands
are zeros). ``use_native()`` (recorded as ``ProcessGroup.native``) is True on Ascend and GPU,
and then only ``all_gather``, ``reduce_scatter`` and ``all_to_all`` (hence
``all_to_all_uneven``) switch to the native ``AllGather`` / ``ReduceScatter`` / ``AlltoAll``
kernels. ``broadcast``, ``barrier``, max / min all-reduce (all-gather + local reduce) and the
point-to-point ``exchange`` / ``send`` / ``recv`` are composed on every device; the SUM
all-reduce is MindSpore's kernel everywhere. The native branches have not run on an
accelerator (this project tests on CPU). Set ``MSF_COMM=composed`` to force the compositions on
any device (useful to compare both paths on a device that has kernels).
"""
from __future__ import annotations

import os

import mindspore as ms

NATIVE_DEVICES = ("Ascend", "GPU")


def use_native() -> bool:
    """True on Ascend and GPU (unless ``MSF_COMM=composed``): all-gather, reduce-scatter and
    all-to-all then use the device's kernels on sub-groups (see the module docstring)."""
    if os.environ.get("MSF_COMM", "auto") == "composed":
        return False
    return ms.get_context("device_target") in NATIVE_DEVICES
