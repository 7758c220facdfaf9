"""MindSpore Cells around the optimizer-update kernels (``csrc/adamw_kernels.cc``), float32.

- ``CpuSquaredNorm()(g [...]) -> sum(g^2) []``: summed in fixed blocks of 2^14 elements (double
  within a block, blocks in index order), so the result does not depend on the thread count.
  Composed reference: ``(g * g).sum()`` (``mcore.distributed.grad_norm``).
- ``CpuAdamW()(w, g, m, v [...], scalars [6]) -> [1]`` (a dummy 0 to keep the call in the graph):
  with ``scalars = (lr, b1, b2, eps, wd, coef)`` and ``gc = g * coef``, IN PLACE::

      m += (gc - m)(1 - b1);  v += (gc^2 - v)(1 - b2);  w -= lr (m / (sqrt(v) + eps) + wd w);  g = 0

  in one pass over the four tensors (MindSpore's ``ops.AdamWeightDecay`` formulas, plus the clip
  factor and the zeroing of the gradient buffer). Composed reference: ``training.adamw``'s
  ``ApplyAdamW`` (``g *= coef`` in the finalise graph, ``ops.AdamWeightDecay``, ``g = 0``).
  ``w``, ``g``, ``m``, ``v`` must be Parameters (the kernel writes their buffers; MindSpore does
  not see the writes, so nothing else in the same graph may read them after the call). Not
  differentiable.
- ``CpuAccAdd()(acc, g [...]) -> [1]`` (a dummy 0): ``acc += g`` IN PLACE, the gradient
  accumulation of the training step; the same sums as the composed reference
  ``ops.assign_add(acc, g)`` (``training.step.ForwardBackward``). ``acc`` must be a Parameter
  that nothing in the same graph reads after the call. Not differentiable.

Build them through ``mcore.fusions.registry`` (ops ``squared_norm``, ``adamw``, ``acc_add``).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


def _scalar_shape(*shapes):
    return [1]


def _float32(*dtypes):
    return ms.float32


class CpuSquaredNorm(nn.Cell):
    """``sum(g^2)`` as a float32 scalar; see the module docstring. Other dtypes: composed."""

    def __init__(self, library: str):
        super().__init__()
        self.kernel = ops.Custom(f"{library}:SquaredNorm", out_shape=_scalar_shape,
                                 out_dtype=_float32, func_type="aot")

    def construct(self, g):
        if g.dtype != ms.float32:
            return (g * g).sum().astype(ms.float32)
        return self.kernel(g).reshape(())  # [1] -> []


class CpuAdamW(nn.Cell):
    """One in-place AdamW step of one parameter; see the module docstring."""

    def __init__(self, library: str):
        super().__init__()
        self.kernel = ops.Custom(f"{library}:AdamWInPlace", out_shape=_scalar_shape,
                                 out_dtype=_float32, func_type="aot")

    def construct(self, w, g, m, v, scalars):
        return self.kernel(w, g, m, v, scalars)


class CpuAccAdd(nn.Cell):
    """``acc += g`` in place for float32 ``acc`` and ``g``; see the module docstring."""

    def __init__(self, library: str):
        super().__init__()
        self.kernel = ops.Custom(f"{library}:AccAddInPlace", out_shape=_scalar_shape,
                                 out_dtype=_float32, func_type="aot")

    def construct(self, acc, g):
        return self.kernel(acc, g)
