"""Column- and row-parallel linear layers (Megatron), with the tp group passed in.

Weights use the ``nn.Linear`` layout ``[out, in]`` (y = x W^T + b), split on dim 0 (column) or
dim 1 (row). Activations are ``[b, s, h]`` (any leading dims without sequence parallelism).
``P`` = tp group size. A Column -> Row pair needs no communication in between:

    x [b, s, h] -> ColumnParallelLinear(h, f) -> [b, s, f/P] -> act -> RowParallelLinear(f, h)
      -> [b, s, h]     (one all-reduce in forward, one in backward)

With ``sequence_parallel=True`` the activations outside the pair are split on the sequence:
the column layer all-gathers its input [b, s/P, h] -> [b, s, h] and the row layer
reduce-scatters its output [b, s, h] -> [b, s/P, h] (same bytes as one all-reduce).
The replicated bias of a sequence-parallel RowParallelLinear then receives only this rank's
part of its gradient: it is marked ``param.sequence_parallel = True`` and its gradient must be
summed over the tp group by the caller (``mcore.distributed.finalize.GradFinalizer``, which the
training steps use, does it for every parameter so marked, norm weights included).

Parameters are initialised from the full master weight drawn from ``seed`` (see
``mcore.tensor_parallel.random``), so any tp size gives the same model at step 0.

``lora``: an optional LoRA adapter (``mcore.tensor_parallel.lora.attach_lora``) whose output is
added before the bias; ``None`` by default.

``name`` identifies a layer: it seeds the initial weight (when ``seed`` is None) and names the
parameters ``<name>.weight`` / ``<name>.bias``, so standalone layers with distinct names can
share one optimizer (MindSpore needs unique parameter names there). Inside a Cell tree,
MindSpore renames every parameter after its attribute path
(``decoder.layers.0.mlp.linear_fc1.weight``), whatever its initial name. Two layers built with
the same ``name`` start from the same weights and clash in an optimizer: give each standalone
layer its own name.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops

from mcore.fusions.decode_ops import LAYER_ROWS
from mcore.fusions.registry import fused_cell
from mcore.parallel_state import ProcessGroup
from mcore.tensor_parallel.mappings import (CopyToTPRegion, GatherFromSPRegion,
                                            GatherFromTPRegion, ReduceFromTPRegion,
                                            ReduceScatterToSPRegion, ScatterToTPRegion)
from mcore.tensor_parallel.random import init_shard, name_seed


def divide(n: int, group: ProcessGroup, layer: str, name: str, what: str) -> int:
    """``n / group.size`` or a ``ValueError`` naming the layer, the dimension and the sizes."""
    if n % group.size:
        raise ValueError(f"{layer} '{name}': {what} {n} is not divisible by tp size {group.size}")
    return n // group.size


def check_sequence(x, group: ProcessGroup, layer: str, name: str) -> None:
    """Sequence-parallel layers reduce-scatter dim 1: it must divide by the tp size."""
    if x.shape[1] % group.size:
        raise ValueError(f"{layer} '{name}': sequence length {x.shape[1]} (dim 1 of input shape "
                         f"{x.shape}) is not divisible by tp size {group.size}")


def _param(array: np.ndarray, name: str, sequence_parallel: bool = False,
           dtype=ms.float32) -> Parameter:
    param = Parameter(ms.Tensor(array, dtype), name=name)
    param.sequence_parallel = sequence_parallel
    return param


class _ParallelLinear(nn.Cell):
    """Shared parts: the weight shard, the optional bias, and ``y = x W^T``."""

    fp16 = bf16 = False  # Cell.to_float(float16 / bfloat16) sets them on the instance

    def __init__(self, layer, input_size, output_size, group, split_dim, bias, bias_split,
                 skip_bias_add, sequence_parallel, init_method, seed, name, params_dtype,
                 partitions=None):
        super().__init__()
        self.input_size, self.output_size, self.group = input_size, output_size, group
        self.skip_bias_add, self.sequence_parallel = skip_bias_add, sequence_parallel
        self.layer_name = name
        self.partitions = tuple(partitions) if partitions else None
        self.lora = None  # a LoRAAdapter (mcore.tensor_parallel.lora.attach_lora) adds to y
        what = "output_size" if split_dim == 0 else "input_size"
        divide(output_size if split_dim == 0 else input_size, group, layer, name, what)
        for part in partitions or ():
            divide(part, group, layer, name, f"fused part of {what}")
        seed = name_seed(name) if seed is None else seed
        self.weight = _param(init_shard((output_size, input_size), seed, group.size, group.rank,
                                        split_dim, init_method, partitions),
                             f"{name}.weight", False, params_dtype)
        self.bias = None
        self.has_bias = bias
        if bias:
            n = output_size // group.size if bias_split else output_size
            self.bias = _param(np.zeros(n, np.float32), f"{name}.bias",
                               sequence_parallel and not bias_split, params_dtype)
        self.matmul = ops.MatMul(transpose_b=True)
        # the registry's "matmul" (OpenBLAS sgemm on CPU) for float32; None: ops.MatMul
        self.blas = fused_cell("matmul") if params_dtype == ms.float32 else None
        # decoding's few rows: the registry's "small_matmul" (reads w once; None: as above)
        self.small = fused_cell("small_matmul") if params_dtype == ms.float32 else None

    def product(self, x, w):
        """x [N, in] @ w [out, in]^T -> [N, out]: the fused matmul for float32 inputs."""
        if self.blas is not None and x.dtype == ms.float32 and w.dtype == ms.float32:
            return self.blas(x, w)
        return self.matmul(x, w)

    def small_rows(self, x, w) -> bool:
        """Whether ``x w^T`` takes the small-row kernel: float32 ``x`` and ``w`` (not cast by
        ``to_float``) with at most ``LAYER_ROWS`` rows (a decode step: one per sequence)."""
        rows = 1
        for d in x.shape[:-1]:
            rows *= d
        return (self.small is not None and rows <= LAYER_ROWS and x.dtype == ms.float32
                and w.dtype == ms.float32 and not (self.fp16 or self.bf16))

    def linear(self, x):
        """x [.., in_local] -> x W^T [.., out_local] (no bias)."""
        if self.small_rows(x, self.weight):
            return self.small(x, self.weight)  # [.., in] -> [.., out], no reshape
        lead = x.shape[:-1]
        y = self.product(x.reshape((-1, x.shape[-1])), self.weight)  # [N, in] -> [N, out]
        return y.reshape(lead + (y.shape[-1],))

    def finish(self, y):
        """Add the bias, or return it beside the output when ``skip_bias_add``."""
        if self.skip_bias_add:
            return y, self.bias
        if self.has_bias:
            y = y + self.bias
        return y


class ColumnParallelLinear(_ParallelLinear):
    """y = x A^T + b with A [output_size, input_size] split on output: this rank holds
    ``weight`` [output_size/P, input_size] and ``bias`` [output_size/P].

    Input: [b, s, input_size] replicated on the tp ranks (or [b, s/P, input_size] with
    ``sequence_parallel``). Output: [b, s, output_size/P], or [b, s, output_size] replicated
    with ``gather_output``. Returns ``y``, or ``(y, bias)`` with ``skip_bias_add``.

    ``partitions``: for a fused projection (e.g. ``(q, k, v)`` or ``(gate, up)`` output sizes),
    each part is split across tp separately, so this rank's rows are ``[q_r; k_r; v_r]`` and the
    initial full weight ``[q; k; v]`` is the same for every tp size.
    """

    shard_dims = {"weight": 0, "bias": 0}

    def __init__(self, input_size: int, output_size: int, tp_group: ProcessGroup,
                 bias: bool = True, gather_output: bool = False, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, init_method=None, seed: int | None = None,
                 name: str = "column_parallel_linear", params_dtype=ms.float32,
                 partitions: tuple[int, ...] | None = None):
        if gather_output and sequence_parallel:
            raise ValueError(f"ColumnParallelLinear '{name}': gather_output and "
                             "sequence_parallel cannot both be set")
        super().__init__("ColumnParallelLinear", input_size, output_size, tp_group, 0, bias, True,
                         skip_bias_add, sequence_parallel, init_method, seed, name, params_dtype,
                         partitions)
        self.gather_output = gather_output
        if sequence_parallel:
            self.enter = GatherFromSPRegion(tp_group)  # [b, s/P, h] -> [b, s, h]
        else:
            self.enter = CopyToTPRegion(tp_group)
        self.gather = GatherFromTPRegion(tp_group) if gather_output else None

    def construct(self, x):
        y = self.linear(self.enter(x))  # [b, s, in] -> [b, s, out/P]
        if self.lora is not None:  # reads x before the f region (mcore/tensor_parallel/lora.py)
            y = y + self.lora(x)
        if self.has_bias and not self.skip_bias_add:
            y = y + self.bias
        if self.gather_output:
            y = self.gather(y)  # [b, s, out/P] -> [b, s, out]
        if self.skip_bias_add:
            return y, self.bias
        return y


class RowParallelLinear(_ParallelLinear):
    """y = x A^T + b with A [output_size, input_size] split on input: this rank holds
    ``weight`` [output_size, input_size/P]; ``bias`` [output_size] is replicated and added
    once, after the reduction.

    Input: [b, s, input_size/P] (``input_is_parallel``, e.g. from a ColumnParallelLinear) or
    [b, s, input_size] replicated (then split here). Output: [b, s, output_size] replicated,
    or [b, s/P, output_size] with ``sequence_parallel`` (requires ``input_is_parallel``).
    Returns ``y``, or ``(y, bias)`` with ``skip_bias_add``.
    """

    shard_dims = {"weight": 1, "bias": None}

    def __init__(self, input_size: int, output_size: int, tp_group: ProcessGroup,
                 bias: bool = True, input_is_parallel: bool = True, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, init_method=None, seed: int | None = None,
                 name: str = "row_parallel_linear", params_dtype=ms.float32):
        if sequence_parallel and not input_is_parallel:
            raise ValueError(f"RowParallelLinear '{name}': sequence_parallel requires "
                             "input_is_parallel=True")
        super().__init__("RowParallelLinear", input_size, output_size, tp_group, 1, bias, False,
                         skip_bias_add, sequence_parallel, init_method, seed, name, params_dtype)
        self.input_is_parallel = input_is_parallel
        self.scatter = None if input_is_parallel else ScatterToTPRegion(tp_group)
        if sequence_parallel:
            self.reduce = ReduceScatterToSPRegion(tp_group)  # [b, s, h] -> [b, s/P, h]
        else:
            self.reduce = ReduceFromTPRegion(tp_group)

    def construct(self, x):
        if not self.input_is_parallel:
            x = self.scatter(x)  # [b, s, in] -> [b, s, in/P]
        if self.sequence_parallel:
            check_sequence(x, self.group, "RowParallelLinear", self.layer_name)
        y = self.reduce(self.linear(x))  # partial sums -> [b, s, out] or [b, s/P, out]
        if self.lora is not None:  # same layout as y (mcore/tensor_parallel/lora.py)
            y = y + self.lora(x)
        return self.finish(y)


class ReplicatedLinear(_ParallelLinear):
    """y = x A^T + b with the whole ``weight`` [output_size, input_size] on every tp rank (no
    communication; the same tp-independent initial weight as the parallel layers).

    For small projections every rank computes on its own copy of the input (MLA's
    down-projections). With ``sequence_parallel`` the input is this rank's ``[b, s/P, in]``, so
    each rank's weight gradient covers only its part of the sequence: the parameters are then
    flagged ``param.sequence_parallel`` and the gradient finaliser sums them over tp. Without it
    the input and its gradient must be complete on every rank (the caller's next layer sums the
    partial gradients, e.g. a ``ColumnParallelLinear``'s ``CopyToTPRegion``), so the weight
    gradients are complete and equal on every rank.
    """

    shard_dims = {"weight": None, "bias": None}

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 sequence_parallel: bool = False, init_method=None, seed: int | None = None,
                 name: str = "replicated_linear", params_dtype=ms.float32, **unused):
        one = ProcessGroup.single("tp")
        super().__init__("ReplicatedLinear", input_size, output_size, one, 0, bias, True, False,
                         False, init_method, seed, name, params_dtype)
        for param in self.get_parameters():
            param.sequence_parallel = bool(sequence_parallel)

    def construct(self, x):
        return self.finish(self.linear(x))  # [.., in] -> [.., out]


class NormHead(ColumnParallelLinear):
    """An output head whose weight rows are scaled to unit L2 norm before the product
    (Baichuan2's ``NormHead``): ``y = x (W / ||W||_row)^T`` with ``||w|| = max(|w|_2, eps)``,
    ``eps = 1e-12``. Each tp rank holds whole rows ``[V/P, h]``, so the normalisation needs no
    communication; gradients flow through it (the stored ``weight`` is the raw one, as
    checkpoints hold it). Otherwise a ``ColumnParallelLinear`` without bias."""

    EPS = 1e-12

    def __init__(self, input_size: int, output_size: int, tp_group: ProcessGroup, **kwargs):
        super().__init__(input_size, output_size, tp_group, bias=False, **kwargs)
        self.eps_sq = ms.Tensor(self.EPS * self.EPS, ms.float32)

    def linear(self, x):
        """x [.., in] -> x (W / ||W||_row)^T [.., out_local]."""
        w = self.weight
        sq = (w.astype(ms.float32) ** 2).sum(-1, keepdims=True)  # [V/P, h] -> [V/P, 1]
        unit = w * ops.rsqrt(ops.maximum(sq, self.eps_sq)).astype(w.dtype)  # [V/P, h]
        lead = x.shape[:-1]
        y = self.product(x.reshape((-1, x.shape[-1])), unit)  # [N, in] -> [N, out]
        return y.reshape(lead + (y.shape[-1],))
