"""MindSpore Cells around the C++ CPU kernels (``csrc/cpu_kernels.cc``), float32 only.

Each Cell calls an ``ops.Custom(func_type="aot")`` forward whose ``bprop`` calls the matching
backward kernel, so they differentiate in PyNative, under ``mindspore.jit`` and in GRAPH_MODE.
Callers check the dtype and use the composed op for anything but float32.

- ``CpuRMSNorm(eps)(x [..., h], weight [h]) -> [..., h]``
- ``CpuSwiGLU()(y [..., 2f]) -> [..., f]``: ``silu(y[..., :f]) * y[..., f:]``
- ``CpuRotary(interleaved)(x [b, n, s, d], cos, sin [b or 1, 1, s, r]) -> [b, n, s, d]``;
  cos and sin are treated as constants (their gradient is zero: they come from positions).

Build them through ``mcore.fusions.registry``, which compiles the library and falls back to
the composed ops when that fails.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops


def _custom(library: str, name: str, out_shape, out_dtype, bprop=None):
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype,
                      func_type="aot", bprop=bprop)


def _same(shape, *rest):
    return shape


def _same_dtype(dtype, *rest):
    return dtype


class CpuRMSNorm(nn.Cell):
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` with the rstd of the forward kept for the
    backward (one pass over x each way)."""

    def __init__(self, library: str, eps: float):
        super().__init__()
        self.eps = Tensor([eps], ms.float32)
        backward = _custom(library, "RmsNormBwd",
                           lambda dy, x, w, r: (x, w), lambda dy, x, w, r: (x, w))

        def bprop(x, w, eps, out, dout):
            dx, dw = backward(dout[0], x, w, out[1])
            return dx, dw, ops.zeros_like(eps)

        self.forward = _custom(library, "RmsNormFwd",
                               lambda x, w, e: (x, x[:-1]), lambda x, w, e: (x, x), bprop)

    def construct(self, x, weight):
        return self.forward(x, weight, self.eps)[0]


class CpuSwiGLU(nn.Cell):
    """``[gate | up] [..., 2f] -> silu(gate) * up [..., f]``."""

    def __init__(self, library: str):
        super().__init__()
        backward = _custom(library, "SwiGLUBwd", lambda d, y: y, lambda d, y: y)

        def bprop(y, out, dout):
            return (backward(dout, y),)

        self.forward = _custom(library, "SwiGLUFwd", lambda y: y[:-1] + [y[-1] // 2],
                               _same_dtype, bprop)

    def construct(self, y):
        return self.forward(y)


class CpuRotary(nn.Cell):
    """Rotate the first ``r`` dims of each head; the rest pass through (``apply_rotary``)."""

    def __init__(self, library: str, interleaved: bool = False):
        super().__init__()
        kind = "Interleaved" if interleaved else "Half"
        backward = _custom(library, f"Rope{kind}Bwd", _same, _same_dtype)

        def bprop(x, cos, sin, out, dout):
            return backward(dout, cos, sin), ops.zeros_like(cos), ops.zeros_like(sin)

        self.forward = _custom(library, f"Rope{kind}Fwd", _same, _same_dtype, bprop)

    def construct(self, x, cos, sin):
        return self.forward(x, cos, sin)
