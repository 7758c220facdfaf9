"""Normalisation layers: RMSNorm and LayerNorm over the last dimension, computed in fp32.

Both take ``(hidden_size, eps)`` (plus ignored keyword arguments, so that specs can pass a
config-derived superset) and map ``[..., h] -> [..., h]``. Parameter names follow Hugging Face:
``weight`` (and ``bias`` for LayerNorm) under the attribute path of a parent Cell. A standalone
norm names them ``<name>.weight`` / ``<name>.bias``: give two standalone norms different
``name``s to optimize them together (MindSpore needs unique parameter names).

RMSNorm takes the fused kernel of ``mcore.fusions`` (op "rms_norm") when the registry has one
for the device and both the input and the weight are float32 (``fused``: None = the registry
decides, False = always the composed math below). ``RMSNorm.add_and_norm(x, r)`` returns
``(x + r, RMSNorm(x + r))``, the residual add of a decoder layer and its pre-MLP norm; after
``fuse_residual_add()`` it runs as one kernel (op "add_rms_norm") where the registry has one.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from mcore.fusions.registry import fused_cell


class RMSNorm(nn.Cell):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` (statistics in fp32, output in x's dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=ms.float32,
                 name: str = "rmsnorm", fused: bool | None = None, **unused):
        super().__init__()
        self.eps = float(eps)
        self.weight = Parameter(initializer("ones", (hidden_size,), dtype), name=f"{name}.weight")
        kernel = fused_cell("rms_norm", fused, eps=self.eps) if dtype == ms.float32 else None
        self.use_kernel = kernel is not None
        if self.use_kernel:
            self.kernel = kernel
        self.fused = fused
        self.use_add_kernel = False

    def fuse_residual_add(self) -> bool:
        """Build the fused add + norm kernel for ``add_and_norm`` when the registry has one
        (float32 weight; never with ``fused=False``). True when it is used."""
        if self.weight.dtype == ms.float32 and self.fused is not False:
            kernel = fused_cell("add_rms_norm", eps=self.eps)
            if kernel is not None:
                self.add_kernel = kernel
                self.use_add_kernel = True
        return self.use_add_kernel

    def add_and_norm(self, x, residual):
        """``(s, RMSNorm(s))`` with ``s = x + residual`` (``[..., h]`` each); float32 ``x``
        takes the fused kernel when built (``residual`` cast to float32 first, as the add
        would promote it)."""
        if self.use_add_kernel and x.dtype == ms.float32:
            return self.add_kernel(x, residual.astype(ms.float32), self.weight)
        s = x + residual
        return s, self.construct(s)

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x, self.weight)
        if x.dtype == ms.float32:
            return self.weight * (x * ops.rsqrt(ops.mean(x * x, -1, True) + self.eps))
        x32 = x.astype(ms.float32)
        var = ops.mean(x32 * x32, -1, True)  # [..., 1]
        y = x32 * ops.rsqrt(var + self.eps)
        return self.weight * y.astype(x.dtype)


class LayerNorm(nn.Cell):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dim."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype=ms.float32,
                 name: str = "layernorm", **unused):
        super().__init__()
        self.eps = float(eps)
        self.weight = Parameter(initializer("ones", (hidden_size,), dtype), name=f"{name}.weight")
        self.bias = Parameter(initializer("zeros", (hidden_size,), dtype), name=f"{name}.bias")

    def construct(self, x):
        dtype = x.dtype
        x32 = x.astype(ms.float32)
        mean = ops.mean(x32, -1, True)  # [..., 1]
        xc = x32 - mean
        var = ops.mean(xc * xc, -1, True)
        y = (xc * ops.rsqrt(var + self.eps)).astype(dtype)
        return y * self.weight + self.bias


def mark_sequence_parallel(cell: nn.Cell) -> None:
    """Flag every parameter of ``cell`` (a norm applied to ``[b, s/tp, h]``, or to this rank's
    heads only) as replicated over tp with a partial gradient per rank: the gradient finaliser
    sums it over tp (see the module docstring)."""
    for param in cell.get_parameters():
        param.sequence_parallel = True


def norm_class(kind: str):
    """The norm class for ``TransformerConfig.norm``."""
    return {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[kind]
