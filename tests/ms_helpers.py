"""Small MindSpore helpers for test workers (imports MindSpore: use inside rank workers)."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn

MODES = ("pynative", "jit")


class Apply(nn.Cell):
    """``fn(x, *args)`` as a Cell, so that ``mindspore.jit`` can compile it (no lambdas in jit)."""

    def __init__(self, fn, args=()):
        super().__init__()
        self.fn, self.args = fn, tuple(args)

    def construct(self, x):
        return self.fn(x, *self.args)


class WeightedSum(nn.Cell):
    """``(net(x) * w).sum()``: a scalar objective whose gradient w.r.t. ``net``'s output is
    ``w`` (differentiate it to test or time a layer's backward with a chosen output gradient)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x, w):
        return (self.net(x) * w).sum()


def _eager(fn):
    return fn


def compiler(mode: str):
    """``mindspore.jit`` for mode "jit", the identity for "pynative"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return ms.jit if mode == "jit" else _eager
