"""The registry of fused ops: for each, a composed reference and per-device fused builders.

One rule: every fused op has a composed reference that runs on every device and a test that the
two agree forward and backward (``tests/mcore/fusions``). The choice is made when a layer is
built (``fused_cell``), never per call:

- CPU: the op's CPU kernel when the compiler is there and the build succeeds: the C++
  kernels of ``csrc/`` (compiled at first use, ``cpu_build``) and the matmul whose backward is
  OpenBLAS sgemm (a library of its own built by ``blas_build``; ``BLAS_MATMUL_BY_DEFAULT``
  records the measured choice, docs/performance.md "BLAS matmul"); else the composed op (a
  warning says why, once per process). An op registered with ``cpu_by_default=False`` takes its
  kernel only with ``MSFORMERS_FUSIONS=kernels``.
- Ascend: the device's own fused op where the registry lists one (``device_builders``).
- Anything else: the composed op.

Switch: ``MSFORMERS_FUSIONS=composed`` forces the composed op everywhere (the way out of the
CPU kernels); ``MSFORMERS_FUSIONS=auto`` (the default) and ``kernels`` choose as above;
``kernels:rms_norm,swiglu`` takes the CPU kernels of the listed ops only (the others composed);
``fused=False`` on a layer forces the composed op for that layer only. The ops (their
``composed`` entry is the reference the layers use):

| name | composed | CPU kernel | Ascend |
|---|---|---|---|
| rms_norm | ``RMSNorm`` math in ``mcore.transformer.norm`` | ``CpuRMSNorm`` | ``ops.rms_norm`` |
| add_rms_norm | ``x + r`` then ``RMSNorm`` (``RMSNorm.add_and_norm``) | ``CpuAddRMSNorm`` | composed |
| swiglu | ``silu(gate) * up`` in ``mcore.transformer.mlp`` | ``CpuSwiGLU`` | ``ops.swiglu`` |
| rotary | ``apply_rotary`` in ``mcore.transformer.rotary`` | ``CpuRotary`` | composed |
| attention | ``blocked_attention`` (``fusions/attention.py``) | ``CpuCausalAttention`` | ``flash_attention_score`` |
| matmul | ``ops.MatMul(transpose_b=True)`` (``tensor_parallel.layers``) | ``CpuMatmul`` (OpenBLAS backward) | composed |
| small_matmul | ``ops.MatMul(transpose_b=True)`` on a few rows (decoding) | ``CpuSmallMatmul`` | composed |
| decode_layer | ``TransformerLayer`` one-token step with a ``StaticKVCache`` | ``CpuDecodeLayer`` | composed |
| cross_entropy | ``VocabParallelCrossEntropy`` at tp=1 | ``CpuCrossEntropy`` | composed |
| squared_norm | ``(g * g).sum()`` (``mcore.distributed.grad_norm``) | ``CpuSquaredNorm`` | composed |
| adamw | ``ApplyAdamW`` with ``ops.AdamWeightDecay`` (``training.adamw``) | ``CpuAdamW`` (in place) | composed |
| acc_add | ``ops.assign_add(acc, g)`` (``training.step.ForwardBackward``) | ``CpuAccAdd`` (in place) | composed |
| grouped_matmul | ``mcore.moe.grouped_matmul`` | ``CpuGroupedMatmul`` (OpenBLAS) | composed |
| moe_permute | ``mcore.moe.permute.permute`` | ``CpuMoePermute`` | composed |
| moe_unpermute | ``mcore.moe.permute.unpermute`` | ``CpuMoeUnpermute`` | composed |

Fused kernels cover float32 inputs on CPU; layers call the composed op for other dtypes.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import mindspore as ms
from mindspore import nn, ops

from mcore.fusions import cpu_ops, decode_layer, decode_ops, moe_ops, optimizer_ops
from mcore.fusions.blas_build import blas_threads, build_blas_matmul, set_blas_threads
from mcore.fusions.cpu_build import KernelBuildError, build_cpu_kernels

ENV = "MSFORMERS_FUSIONS"
MODES = ("auto", "composed", "kernels")
BLAS_MATMUL_BY_DEFAULT = True  # "matmul" in "auto" mode: measured, docs/performance.md
DECODE_LAYER_BY_DEFAULT = True  # "decode_layer" in "auto" mode: measured, docs/performance.md


@dataclass(frozen=True)
class FusedOp:
    """One registry entry. ``cpu_builder(library, **kwargs)`` and each
    ``device_builders[device](**kwargs)`` return a Cell computing the same function as the
    composed reference (documented in the module docstring table). ``cpu_by_default``: the CPU
    kernel is used in the "auto" mode too (not only with "kernels")."""

    name: str
    reference: str
    cpu_builder: Callable | None = None
    device_builders: dict = field(default_factory=dict)
    cpu_library: str = "kernels"  # which library cpu_builder takes: "kernels" or "blas"
    cpu_by_default: bool = True  # the CPU kernel in "auto" mode too (not only with "kernels")


class _AscendRMSNorm(nn.Cell):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = float(eps)

    def construct(self, x, weight):
        return ops.rms_norm(x, weight, self.eps)[0]


class _AscendSwiGLU(nn.Cell):
    def construct(self, y):
        return ops.swiglu(y, -1)


REGISTRY = {op.name: op for op in (
    # The norm kernels give the same bits for any thread count (csrc/common.h).
    FusedOp("rms_norm", "mcore.transformer.norm.RMSNorm", cpu_builder=cpu_ops.CpuRMSNorm,
            device_builders={"Ascend": _AscendRMSNorm}),
    FusedOp("add_rms_norm", "mcore.transformer.norm.RMSNorm.add_and_norm",
            cpu_builder=cpu_ops.CpuAddRMSNorm),
    FusedOp("swiglu", "mcore.transformer.mlp.silu(gate) * up",
            cpu_builder=cpu_ops.CpuSwiGLU, device_builders={"Ascend": _AscendSwiGLU}),
    FusedOp("rotary", "mcore.transformer.rotary.apply_rotary", cpu_builder=cpu_ops.CpuRotary),
    FusedOp("attention", "mcore.fusions.attention.blocked_attention",
            cpu_builder=cpu_ops.CpuCausalAttention, device_builders={"Ascend": None}),  # CoreAttention calls flash_attention_score itself
    FusedOp("matmul", "ops.MatMul(transpose_b=True)", cpu_builder=cpu_ops.CpuMatmul,
            cpu_library="blas", cpu_by_default=BLAS_MATMUL_BY_DEFAULT),
    # Decoding's few rows (tensor_parallel.layers): w read once by sleeping helper threads.
    FusedOp("small_matmul", "ops.MatMul(transpose_b=True) on a few rows",
            cpu_builder=decode_ops.CpuSmallMatmul),
    # A dense layer's whole one-token step over a StaticKVCache (TransformerLayer, decoding).
    FusedOp("decode_layer", "mcore.transformer.layer.TransformerLayer, one token, StaticKVCache",
            cpu_builder=decode_layer.CpuDecodeLayer, cpu_by_default=DECODE_LAYER_BY_DEFAULT),
    FusedOp("cross_entropy", "mcore.tensor_parallel.cross_entropy.VocabParallelCrossEntropy",
            cpu_builder=cpu_ops.CpuCrossEntropy),
    # The optimizer update (training.adamw, mcore.distributed.grad_norm): the norm sums in fixed
    # blocks, so it does not depend on the thread count.
    FusedOp("squared_norm", "(g * g).sum() in mcore.distributed.grad_norm",
            cpu_builder=optimizer_ops.CpuSquaredNorm),
    FusedOp("adamw", "training.adamw.ApplyAdamW (ops.AdamWeightDecay, then acc = 0)",
            cpu_builder=optimizer_ops.CpuAdamW),
    FusedOp("acc_add", "ops.assign_add(acc, g) in training.step.ForwardBackward",
            cpu_builder=optimizer_ops.CpuAccAdd),
    # The experts' products (mcore.moe.experts.GroupedMLP): one sgemm per expert's rows.
    FusedOp("grouped_matmul", "mcore.moe.grouped_matmul.grouped_matmul",
            cpu_builder=moe_ops.CpuGroupedMatmul, cpu_library="blas"),
    # The dispatchers' token permutation (mcore.moe.permute.Permutation).
    FusedOp("moe_permute", "mcore.moe.permute.permute", cpu_builder=moe_ops.CpuMoePermute),
    FusedOp("moe_unpermute", "mcore.moe.permute.unpermute", cpu_builder=moe_ops.CpuMoeUnpermute),
)}


def _parse_switch() -> tuple[str, frozenset | None]:
    """``(mode, ops)`` from ``$MSFORMERS_FUSIONS``: ``kernels:rms_norm,swiglu`` is mode
    "kernels" for the listed ops only (``ops`` None: every op). ValueError naming the variable
    for an unknown mode or op."""
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    mode, _, listed = raw.partition(":")
    if mode not in MODES or (listed and mode != "kernels"):
        raise ValueError(f"{ENV}={raw!r}: expected one of {MODES} or 'kernels:<op>,<op>'")
    if not listed:
        return mode, None
    ops_ = frozenset(n.strip() for n in listed.split(",") if n.strip())
    unknown = sorted(ops_ - set(REGISTRY))
    if unknown:
        raise ValueError(f"{ENV}={raw!r}: unknown fused op(s) {unknown}; "
                         f"registered: {sorted(REGISTRY)}")
    return mode, ops_


def fusions_mode() -> str:
    """The mode of ``$MSFORMERS_FUSIONS`` (default "auto"); ValueError naming the variable when
    unknown."""
    return _parse_switch()[0]


@functools.lru_cache(maxsize=None)
def blas_library() -> str | None:
    """The BLAS matmul library with ``$MSFORMERS_BLAS_THREADS`` OpenBLAS threads, or None
    (with one warning) when it cannot be built."""
    try:
        library = build_blas_matmul()
    except KernelBuildError as exc:
        warnings.warn(f"mcore.fusions: BLAS matmul unavailable, using ops.MatMul and the "
                      f"composed grouped matmul: {exc}",
                      RuntimeWarning, stacklevel=2)
        return None
    set_blas_threads(library, blas_threads())
    return library


def _library(op: FusedOp) -> str | None:
    return blas_library() if op.cpu_library == "blas" else cpu_library()


@functools.lru_cache(maxsize=None)
def cpu_library() -> str | None:
    """The compiled CPU kernel library, or None (with one warning) when it cannot be built."""
    try:
        return build_cpu_kernels()
    except KernelBuildError as exc:
        warnings.warn(f"mcore.fusions: CPU kernels unavailable, using composed ops: {exc}",
                      RuntimeWarning, stacklevel=2)
        return None


def choice(name: str, device: str | None = None) -> str:
    """What ``fused_cell(name)`` builds on ``device`` (default: the current target):
    "cpu_kernel", "device" or "composed"."""
    op = REGISTRY[name]
    device = device or ms.get_context("device_target")
    mode, selected = _parse_switch()
    if mode == "composed":
        return "composed"
    wanted = ((mode == "kernels" and (selected is None or name in selected))
              or (mode == "auto" and op.cpu_by_default))
    if wanted and device == "CPU" and op.cpu_builder is not None and _library(op) is not None:
        return "cpu_kernel"
    if device in op.device_builders:
        return "device"
    return "composed"


def fused_cell(name: str, fused: bool | None = None, **kwargs) -> nn.Cell | None:
    """The fused Cell for op ``name`` on this device, or None: use the composed reference.

    ``fused``: None = decide from the device and ``$MSFORMERS_FUSIONS``; False = composed;
    True = as None, but an error when no fused implementation is available here.
    ``kwargs`` go to the builder (``eps`` for rms_norm and add_rms_norm, ``interleaved`` for
    rotary, ``scale`` for attention, ``ignore_index`` for cross_entropy, ``layer`` for
    decode_layer, ``num_experts`` for moe_permute).
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown fused op {name!r}; registered: {sorted(REGISTRY)}")
    if fused is False:
        return None
    how = choice(name)
    if how == "composed":
        if fused:
            raise RuntimeError(f"fused op {name!r}: no fused implementation on "
                               f"{ms.get_context('device_target')} ({ENV}={fusions_mode()})")
        return None
    op = REGISTRY[name]
    if how == "cpu_kernel":
        return op.cpu_builder(_library(op), **kwargs)
    builder = op.device_builders[ms.get_context("device_target")]
    return None if builder is None else builder(**kwargs)
