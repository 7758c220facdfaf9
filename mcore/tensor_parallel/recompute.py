"""Activation recompute: keep a block's inputs, drop its activations, recompute them in backward.

Built on MindSpore's own mechanism: ``mindspore.recompute(block, *args)`` (PyNative and inside
``mindspore.jit``) and ``Cell.recompute()``. Gradients equal those without recompute (tested,
including blocks with tensor-parallel collectives and custom ``bprop`` Cells). In PyNative the
block's ``construct`` visibly runs twice per forward+backward.

Caveat: a seeded dropout inside a recomputed block draws a NEW mask when recomputed (MindSpore
CPU random ops carry their own counters), so recompute only blocks whose dropout is 0 or that
are in eval mode.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn


def checkpoint(block, *args):
    """``block(*args)``, with ``block``'s activations recomputed in the backward pass.
    ``block``: a Cell (build it once, outside compiled code)."""
    return ms.recompute(block, *args)


class Recompute(nn.Cell):
    """Wrap a Cell so that its forward is recomputed in backward: ``Recompute(block)(*args)``
    equals ``block(*args)`` with the same gradients and less activation memory."""

    def __init__(self, block: nn.Cell):
        super().__init__()
        self.block = block
        self.block.recompute()

    def construct(self, *args):
        return self.block(*args)
