"""MindSpore Cells around the mixture-of-experts kernels of ``mcore/fusions``, float32 only.

- ``CpuGroupedMatmul(x [N, in], w [E, in, out], counts [E] int32) -> [N, out]``: the grouped
  matmul of ``mcore.moe.grouped_matmul`` (rows of expert ``e`` consecutive, rows past
  ``sum(counts)`` zero) through OpenBLAS sgemm, one product per expert
  (``csrc/grouped_matmul.cc``, in the BLAS library of ``blas_build``); the backward gives
  ``dx`` and ``dw`` the same way. It compiles under ``mindspore.jit`` with the counts a Tensor,
  and does the rows' own work (the composed static form multiplies every row by every expert).
- ``CpuMoePermute(num_experts)(x [T, h], experts [T, k] int32) -> (x_sorted [N, h],
  counts [E], order [N])`` and ``CpuMoeUnpermute()(y_sorted [N, h], order [N], weights [T, k])
  -> [T, h]``: ``permute`` / ``unpermute`` of ``mcore.moe.permute`` (``csrc/moe_permute.cc``,
  in the CPU kernel library of ``cpu_build``): a counting sort and one pass over the rows each
  way, where the composed ops sort twice and gather, multiply and sum.

Build them through ``mcore.fusions.registry``, which compiles the library and falls back to
the composed ops when that fails.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops


def _rows_by_out(x, w, counts):
    return [x[0], w[2]]  # [N, in], [E, in, out] -> [N, out]


def _first(first, *rest):
    return first


def _second_two(skip, first, second, *rest):
    return first, second


class CpuGroupedMatmul(nn.Cell):
    """See the module docstring. ``library``: the BLAS kernel library
    (``blas_build.build_blas_matmul``)."""

    def __init__(self, library: str):
        super().__init__()
        backward = ops.Custom(f"{library}:GroupedMatmulBwd", out_shape=_second_two,
                              out_dtype=_second_two, func_type="aot")

        def bprop(x, w, counts, out, dout):
            dx, dw = backward(dout, x, w, counts)
            return dx, dw, ops.zeros_like(counts)

        self.forward = ops.Custom(f"{library}:GroupedMatmulFwd", out_shape=_rows_by_out,
                                  out_dtype=_first, func_type="aot", bprop=bprop)

    def construct(self, x, w, counts):
        return self.forward(x, w, counts)


def _shape_of_third(first, second, third, *rest):
    return third


def _rows_like_weights(y, order, weights):
    return [weights[0], y[1]]  # [T, h]


def _second_and_fourth(first, second, third, fourth, *rest):
    return second, fourth


def _permute_shapes(x, experts, slots):
    pairs = experts[0] * experts[1]
    return [pairs, x[1]], slots, [pairs]  # x_sorted [N, h], counts [E], order [N]


def _like_x_and_routing(x, experts, slots):
    return x, experts, experts  # counts and order int32 like the routing


class CpuMoePermute(nn.Cell):
    """``permute(x [T, h], experts [T, k] int32)`` of ``mcore.moe.permute`` for
    ``num_experts`` experts: ``(x_sorted [N, h], counts [E] int32, order [N] int32)`` by a
    counting sort (``csrc/moe_permute.cc``); the backward sums each token's rows. The kernel
    learns ``E`` from the shape of a constant ``[E]`` input: MindSpore keeps one shape function
    per kernel name, so ``E`` cannot live in a closure."""

    def __init__(self, library: str, num_experts: int):
        super().__init__()
        self.slots = Tensor(np.zeros(int(num_experts), np.int32))
        backward = ops.Custom(f"{library}:MoePermuteBwd", out_shape=_shape_of_third,
                              out_dtype=_first, func_type="aot")

        def bprop(x, experts, slots, out, dout):
            return backward(dout[0], out[2], x), ops.zeros_like(experts), ops.zeros_like(slots)

        self.forward = ops.Custom(f"{library}:MoePermuteFwd", out_shape=_permute_shapes,
                                  out_dtype=_like_x_and_routing, func_type="aot", bprop=bprop)

    def construct(self, x, experts):
        return self.forward(x, experts, self.slots)


class CpuMoeUnpermute(nn.Cell):
    """``unpermute(y_sorted [N, h], order [N] int32, weights [T, k])`` of
    ``mcore.moe.permute`` (float32 ``y`` and weights): ``[T, h]``, each token's rows weighted
    and summed in one pass (``csrc/moe_permute.cc``); the backward gives ``y`` and the
    weights their gradients."""

    def __init__(self, library: str):
        super().__init__()
        backward = ops.Custom(f"{library}:MoeUnpermuteBwd", out_shape=_second_and_fourth,
                              out_dtype=_second_and_fourth, func_type="aot")

        def bprop(y, order, weights, out, dout):
            dy, dw = backward(dout, y, order, weights)
            return dy, ops.zeros_like(order), dw

        self.forward = ops.Custom(f"{library}:MoeUnpermuteFwd", out_shape=_rows_like_weights,
                                  out_dtype=_first, func_type="aot", bprop=bprop)

    def construct(self, y, order, weights):
        return self.forward(y, order, weights)
