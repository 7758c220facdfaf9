"""The small-row matmul of decoding: a MindSpore Cell around ``SmallMatmulNT``
(``csrc/small_matmul.cc``), float32 only.

``CpuSmallMatmul()(x [..., k], w [n, k]) -> x w^T [..., n]`` for at most ``MAX_ROWS`` rows of
``x`` (a decode step has one per sequence). The kernel reads ``w`` once, on the calling thread
and sleeping helper threads that claim blocks of ``w``'s rows (no spinning between calls, so
MindSpore's own kernels keep the cores), and takes ``x`` without a reshape. Each output is one
dot product in a fixed order: the bits do not depend on the thread count
(``$MSFORMERS_DECODE_THREADS``, default: the CPUs of the process). The backward is composed
(``dx = dy w``, ``dw = dy^T x``): a training step with so few rows is a test, not a workload.
The linear layers (``tensor_parallel.layers``) call it for at most ``LAYER_ROWS`` rows and route
more rows and other dtypes to their own matmul.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

MAX_ROWS = 8  # rows::kMaxRows of csrc/row_products.h (the products of this op and decode_layer)
# The linear layers and the decode layer kernel take it for every row count it accepts: up to 8
# rows it beat MindSpore's MatMul in the decode A/B once the 5-8 row products prefetched w
# (docs/performance.md "Decoding", "Batch 8").
LAYER_ROWS = MAX_ROWS


def _rows_by_n(x_shape, w_shape):
    return list(x_shape[:-1]) + [w_shape[0]]  # [..., k], [n, k] -> [..., n]


def _x_dtype(x_dtype, w_dtype):
    return x_dtype


class CpuSmallMatmul(nn.Cell):
    """See the module docstring. ``library``: the compiled CPU kernel library
    (``cpu_build.build_cpu_kernels``)."""

    def __init__(self, library: str):
        super().__init__()
        self.forward = ops.Custom(f"{library}:SmallMatmulNT", out_shape=_rows_by_n,
                                  out_dtype=_x_dtype, func_type="aot")
        self.grad_x, self.grad_w = ops.MatMul(), ops.MatMul(transpose_a=True)

    def construct(self, x, w):
        return self.forward(x, w)  # [..., k] -> [..., n]

    def bprop(self, x, w, out, dout):
        dy = dout.reshape((-1, dout.shape[-1]))  # [..., n] -> [m, n]
        dx = self.grad_x(dy, w)  # [m, n] @ [n, k] -> [m, k]
        dw = self.grad_w(dy, x.reshape((-1, x.shape[-1])))  # [m, n]^T @ [m, k] -> [n, k]
        return dx.reshape(x.shape), dw  # [m, k] -> [..., k]
