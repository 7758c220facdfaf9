"""MindSpore Cells around the C++ CPU kernels (``csrc/*.cc``), float32 only.

Each Cell calls an ``ops.Custom(func_type="aot")`` forward (``CpuMatmul``: MindSpore's MatMul)
whose ``bprop`` calls the matching backward kernel, so they differentiate in PyNative, under
``mindspore.jit`` and in GRAPH_MODE.
Callers check the dtype and use the composed op for anything but float32.

- ``CpuRMSNorm(eps)(x [..., h], weight [h]) -> [..., h]``
- ``CpuAddRMSNorm(eps)(x [..., h], residual [..., h], weight [h]) -> (s, RMSNorm(s))`` with
  ``s = x + residual`` (the residual add before a decoder layer's pre-MLP norm)
- ``CpuSwiGLU()(y [..., 2f]) -> [..., f]``: ``silu(y[..., :f]) * y[..., f:]``
- ``CpuRotary(interleaved)(x [b, n, s, d], cos, sin [b or 1, 1, s, r]) -> [b, n, s, d]``;
  cos and sin are treated as constants (their gradient is zero: they come from positions).
- ``CpuCausalAttention(scale)(q [b, n, s, d], k, v [b, n_kv, t, d]) -> [b, n, s, d]``: causal,
  queries aligned to the end of the keys, grouped kv heads; tiles of query rows x blocks of
  64 keys with an online softmax (``csrc/attention_kernels.cc``).
- ``CpuMatmul(x [m, k], w [n, k]) -> x w^T [m, n]``: ``ops.MatMul`` forward, OpenBLAS sgemm
  backward (its own library, ``blas_build``): ``dx = dy w``, ``dw = dy^T x`` in one call.
- ``CpuCrossEntropy(ignore_index)(logits [..., V], labels [...]) -> loss [...]`` float32 (any
  float logits, upcast); only a log-sum-exp per row is kept for the backward.

Build them through ``mcore.fusions.registry``, which compiles the library and falls back to
the composed ops when that fails.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops


def _custom(library: str, name: str, out_shape, out_dtype, bprop=None):
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype,
                      func_type="aot", bprop=bprop)


# Output shape / dtype functions of the kernels (named functions: MindSpore's parser cannot
# read lambdas inside a multi-line call). Shapes are lists, dtypes MindSpore types.
def _same(shape, *rest):
    return shape


def _same_dtype(dtype, *rest):
    return dtype


def _second_two(skip, first, second, *rest):
    return first, second


def _first_and_rows(first, *rest):
    return first, first[:-1]  # [..., h] and [...]


def _twice(first, *rest):
    return first, first


def _sum_norm_rows(first, *rest):
    return first, first, first[:-1]  # s, y [..., h] and rstd [...]


def _thrice(first, *rest):
    return first, first, first


def _first_and_fourth(first, second, third, fourth, *rest):
    return first, fourth


def _second_three(skip, first, second, third, *rest):
    return first, second, third


def _half_last(shape):
    return shape[:-1] + [shape[-1] // 2]  # [..., 2f] -> [..., f]


def _second(skip, second, *rest):
    return second


class CpuRMSNorm(nn.Cell):
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` with the rstd of the forward kept for the
    backward (one pass over x each way)."""

    def __init__(self, library: str, eps: float):
        super().__init__()
        self.eps = Tensor([eps], ms.float32)
        backward = _custom(library, "RmsNormBwd", _second_two, _second_two)

        def bprop(x, w, eps, out, dout):
            dx, dw = backward(dout[0], x, w, out[1])
            return dx, dw, ops.zeros_like(eps)

        self.forward = _custom(library, "RmsNormFwd", _first_and_rows, _twice, bprop)

    def construct(self, x, weight):
        return self.forward(x, weight, self.eps)[0]


class CpuAddRMSNorm(nn.Cell):
    """``s = x + residual; (s, weight * s / sqrt(mean(s^2, -1) + eps))`` in one pass; the
    backward gives both addends the same gradient ``ds + RMSNorm'(dy)``."""

    def __init__(self, library: str, eps: float):
        super().__init__()
        self.eps = Tensor([eps], ms.float32)
        backward = _custom(library, "AddRmsNormBwd", _first_and_fourth, _first_and_fourth)

        def bprop(x, residual, w, eps, out, dout):
            ds, dw = backward(dout[0], dout[1], out[0], w, out[2])
            return ds, ds, dw, ops.zeros_like(eps)

        self.forward = _custom(library, "AddRmsNormFwd", _sum_norm_rows, _thrice, bprop)

    def construct(self, x, residual, weight):
        out = self.forward(x, residual, weight, self.eps)
        return out[0], out[1]


class CpuSwiGLU(nn.Cell):
    """``[gate | up] [..., 2f] -> silu(gate) * up [..., f]``."""

    def __init__(self, library: str):
        super().__init__()
        backward = _custom(library, "SwiGLUBwd", _second, _second)

        def bprop(y, out, dout):
            return (backward(dout, y),)

        self.forward = _custom(library, "SwiGLUFwd", _half_last, _same_dtype, bprop)

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


class CpuCausalAttention(nn.Cell):
    """Causal attention with the queries aligned to the end of the keys (``blocked_attention``
    without masks): ``q [b, n, s, d], k / v [b, n_kv, t, d] -> [b, n, s, d]``, ``s <= t``,
    ``n % n_kv == 0``. Keeps the log-sum-exp ``[b, n, s]`` for the backward, never ``[s, t]``."""

    def __init__(self, library: str, scale: float):
        super().__init__()
        self.scale = Tensor([scale], ms.float32)
        backward = _custom(library, "AttnCausalBwd", _second_three, _second_three)

        def bprop(q, k, v, scale, out, dout):
            dq, dk, dv = backward(dout[0], q, k, v, out[0], out[1], scale)
            return dq, dk, dv, ops.zeros_like(scale)

        self.forward = _custom(library, "AttnCausalFwd", _first_and_rows, _twice, bprop)

    def construct(self, q, k, v):
        return self.forward(q, k, v, self.scale)[0]


class CpuMatmul(nn.Cell):
    """``x [m, k] @ w [n, k]^T -> [m, n]``: the forward is ``ops.MatMul(transpose_b=True)``
    (as fast as sgemm there, and no custom-op call in decoding), the backward OpenBLAS sgemm
    (``dx = dy w``, ``dw = dy^T x`` in one call), where MindSpore's transposed CPU matmuls are
    slow. ``library`` is the BLAS matmul library (``blas_build.build_blas_matmul``). Inputs
    of another dtype (e.g. cast to float16 by ``Cell.to_float`` of an enclosing layer) take
    MindSpore's matmuls both ways."""

    def __init__(self, library: str):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.grad_x, self.grad_w = ops.MatMul(), ops.MatMul(transpose_a=True)
        self.backward = _custom(library, "MatmulNTBwd", _second_two, _twice)

    def construct(self, x, w):
        return self.matmul(x, w)

    def bprop(self, x, w, out, dout):
        if x.dtype == ms.float32 and w.dtype == ms.float32 and dout.dtype == ms.float32:
            return self.backward(dout, x, w)
        dout = dout.astype(x.dtype)  # MindSpore's matmuls want one dtype
        dx = self.grad_x(dout, w.astype(x.dtype))  # [m, n] [n, k] -> [m, k]
        return dx, self.grad_w(dout, x).astype(w.dtype)  # [n, m] [m, k] -> [n, k]


def _rows_twice(logits, labels):
    return labels, labels  # loss and lse: one per row


def _float32_twice(logits, labels):
    return ms.float32, ms.float32


def _first_shape(first, *rest):
    return first


def _float32(*dtypes):
    return ms.float32


class CpuCrossEntropy(nn.Cell):
    """Cross-entropy over the last axis (the composed ``VocabParallelCrossEntropy`` at tp=1,
    no label smoothing): ``logits [..., V]``, ``labels [...]`` int32 / int64 in ``[0, V)`` or
    ``ignore_index`` -> ``loss [...]`` float32, 0 where ignored. The forward keeps the
    log-sum-exp ``[...]``; the backward writes ``(softmax - onehot) * dloss`` in one pass over
    the logits, its only vocabulary-sized buffer. fp16 / bf16 logits are upcast to float32."""

    def __init__(self, library: str, ignore_index: int = -100):
        super().__init__()
        self.remap = ignore_index >= 0  # the kernel ignores labels outside [0, V)
        self.ignore_index = ignore_index
        backward = _custom(library, "CrossEntropyBwd", _first_shape, _float32)

        def bprop(logits, labels, out, dout):
            grad = backward(logits, labels, out[1], dout[0], dout[1])  # [..., V]
            return grad, ops.zeros_like(labels)

        self.forward = _custom(library, "CrossEntropyFwd", _rows_twice, _float32_twice, bprop)

    def construct(self, logits, labels):
        if logits.dtype != ms.float32:
            logits = logits.astype(ms.float32)
        if self.remap:
            labels = ops.select(labels == self.ignore_index, ops.full_like(labels, -1), labels)
        return self.forward(logits, labels)[0]
