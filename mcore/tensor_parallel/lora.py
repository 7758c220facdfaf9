"""LoRA adapters for ``ColumnParallelLinear`` and ``RowParallelLinear`` (low-rank updates of a
frozen weight), with the same tp layout as the base layer.

For a base ``y = x W^T`` (``W`` [out, in]) an adapter adds ``scale * B (A drop(x))`` with
``A`` [r, in], ``B`` [out, r], ``scale = alpha / r``; ``B`` starts at zero (the adapted model
equals the base at step 0), ``A`` from a seeded uniform(-1/sqrt(in), 1/sqrt(in)) drawn at full
size (every tp size starts from the same adapter). ``attach_lora(base, ...)`` makes the adapter
a child Cell ``base.lora``; the base layer adds its output just before the bias.

Layout and f/g regions (``P`` = tp size; SP = ``sequence_parallel`` of the base):

===========  ====================  ===================  ============================================
base         A (rank holds)        B (rank holds)       forward of the adapter path
===========  ====================  ===================  ============================================
column       [r, in] replicated    [out/P, r] split 0   u = A x; u = copy_to_tp(u); B_r u
column, SP   [r, in] replicated    [out/P, r] split 0   u = A x_sp; u = gather_from_sp(u) [b,s,r]
row          [r, in/P] split 1     [out, r] replicated  u = reduce_from_tp(A_r x_r); B u
row, SP      [r, in/P] split 1     [out, r] replicated  u = reduce_scatter_to_sp(A_r x_r); B u
===========  ====================  ===================  ============================================

The column adapter reads the base's input BEFORE the base's own f region, and puts its f on
the r-dim activation ``u`` instead: the backward all-reduce then gives every rank the full
``du`` (so ``dA = du x^T`` is the one-process gradient) and ``dx = A^T du`` is already
replicated. The row adapter does ``A`` on this rank's input slice and reduces the r-dim result
(r numbers per token instead of ``out``). With SP the replicated parameter that sees only this
rank's part of the sequence (column: ``A``; row: ``B``) is marked ``sequence_parallel`` and the
gradient finaliser sums it over tp, like a norm weight. So tp = P reproduces one process,
forward and backward (dropout 0; with dropout > 0 a row adapter draws its masks per rank).

A fused column layer (``partitions``, e.g. q/k/v or gate/up) takes one adapter per chosen
part (``parts``: which of the fused parts get one); the others add zeros.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops

from mcore.tensor_parallel.mappings import (CopyToTPRegion, GatherFromSPRegion, ReduceFromTPRegion,
                                            ReduceScatterToSPRegion)
from mcore.tensor_parallel.random import Dropout, init_shard, name_seed
from mcore.tensor_parallel.sharding import shard


def lora_init():
    """PEFT's default for ``A``: uniform(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5))."""

    def init(rng: np.random.Generator, shape):
        bound = 1.0 / math.sqrt(shape[1])
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)

    return init


class LoRAPart(nn.Cell):
    """One adapter pair on one output block of a base layer: ``construct(x) -> scale * B f(A x)``.

    ``kind`` "column": ``lora_A`` [r, in] replicated, ``lora_B`` [rows/P, r]; "row": ``lora_A``
    [r, in/P], ``lora_B`` [rows, r] replicated. ``f`` is the region of the table above."""

    def __init__(self, kind: str, in_size: int, rows: int, r: int, alpha: float, dropout: float,
                 group, sequence_parallel: bool, seed: int):
        super().__init__()
        self.kind, self.r, self.scale = kind, int(r), float(alpha) / int(r)
        P = group.size
        column = kind == "column"
        # the full A [r, in] from the seed; a row adapter keeps its input slice [r, in/P]
        a = init_shard((r, in_size), seed, 1 if column else P, 0 if column else group.rank, 1,
                       lora_init())
        b_rows = rows // P if column else rows
        self.lora_A = Parameter(ms.Tensor(a, ms.float32), name="lora_A")
        self.lora_B = Parameter(ops.zeros((b_rows, r), ms.float32), name="lora_B")
        # replicated parameters that see only this rank's sequence slice: summed over tp
        self.lora_A.sequence_parallel = bool(column and sequence_parallel and P > 1)
        self.lora_B.sequence_parallel = bool(not column and sequence_parallel and P > 1)
        self.shard_dims = {"lora_A": None if column else 1, "lora_B": 0 if column else None}
        self.dropout = Dropout(dropout, seed + 1)
        if column:
            self.region = GatherFromSPRegion(group) if sequence_parallel else CopyToTPRegion(group)
        else:
            self.region = ReduceScatterToSPRegion(group) if sequence_parallel \
                else ReduceFromTPRegion(group)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        x = self.dropout(x)
        lead = x.shape[:-1]
        u = self.matmul(x.reshape((-1, x.shape[-1])), self.lora_A)  # [N, in] -> [N, r]
        u = self.region(u.reshape(lead + (self.r,)))  # column SP: [b, s/P, r] -> [b, s, r]
        lead = u.shape[:-1]
        y = self.matmul(u.reshape((-1, self.r)), self.lora_B)  # [N, r] -> [N, rows_local]
        return y.reshape(lead + (y.shape[-1],)) * self.scale

    def delta_weight(self) -> np.ndarray:
        """``scale * B A`` of this rank's shard (column: [rows/P, in]; row: [rows, in/P])."""
        return self.scale * (self.lora_B.asnumpy() @ self.lora_A.asnumpy())


class LoRAAdapter(nn.Cell):
    """The adapters of one base layer: ``construct(x) -> delta`` in the base output's local
    layout (before its bias). ``slots[j]``: index into ``parts`` of fused part ``j``'s adapter,
    or -1 (that block gets zeros)."""

    def __init__(self, parts: list[LoRAPart], slots: tuple[int, ...], local_rows: tuple[int, ...]):
        super().__init__()
        self.parts = nn.CellList(parts)
        self.slots, self.local_rows = tuple(slots), tuple(local_rows)
        self.first = next(s for s in self.slots if s >= 0)

    def construct(self, x):
        if len(self.slots) == 1:
            return self.parts[0](x)
        outs = [self.parts[i](x) for i in range(len(self.parts))]
        lead = outs[self.first].shape[:-1]
        blocks = []
        for j in range(len(self.slots)):
            if self.slots[j] < 0:
                blocks.append(ops.zeros(lead + (self.local_rows[j],), outs[self.first].dtype))
            else:
                blocks.append(outs[self.slots[j]])
        return ops.concat(blocks, -1)  # [.., rows_j/P] for each fused part -> [.., out/P]


def attach_lora(base, chosen: tuple[int, ...], r: int, alpha: float, dropout: float = 0.0,
                seed: int | None = None) -> LoRAAdapter:
    """Give ``base`` (a ``ColumnParallelLinear`` or ``RowParallelLinear``) an adapter on the fused
    parts ``chosen`` (indices into its ``partitions``; ``(0,)`` for an unfused layer); freeze its
    weight and bias (``requires_grad = False``). Returns the adapter (``base.lora``). Attach
    before the first compiled call: a graph compiled earlier keeps its old structure."""
    if r <= 0:
        raise ValueError(f"LoRA rank r={r}: must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout={dropout}: must be in [0, 1)")
    column = type(base).__name__ != "RowParallelLinear"
    sizes = tuple(getattr(base, "partitions", None) or (base.output_size,))
    if not chosen or any(not 0 <= j < len(sizes) for j in chosen):
        raise ValueError(f"attach_lora: parts {chosen} of layer '{base.layer_name}' "
                         f"(it has {len(sizes)})")
    seed = name_seed(base.layer_name + ".lora") if seed is None else seed
    parts, slots = [], []
    for j, rows in enumerate(sizes):
        if j in chosen:
            slots.append(len(parts))
            parts.append(LoRAPart("column" if column else "row", base.input_size, rows, r, alpha,
                                  dropout, base.group, base.sequence_parallel, seed + 7919 * j))
        else:
            slots.append(-1)
    local = tuple(n // base.group.size for n in sizes) if column else sizes
    adapter = LoRAAdapter(parts, tuple(slots), local)
    for p in base.get_parameters(expand=False):
        p.requires_grad = False
    base.lora = adapter
    return adapter


def merge_lora_into(base) -> None:
    """Fold ``base.lora`` into ``base.weight`` (``W += scale B A`` on this rank's shard, no
    communication) and detach it (``base.lora = None``); the weight stays frozen."""
    adapter = base.lora
    if adapter is None:
        return
    w = base.weight.asnumpy().copy()
    if type(base).__name__ == "RowParallelLinear":
        w += adapter.parts[0].delta_weight()
    else:
        start = 0
        for j, rows in enumerate(adapter.local_rows):
            if adapter.slots[j] >= 0:
                w[start:start + rows] += adapter.parts[adapter.slots[j]].delta_weight()
            start += rows
    base.weight.set_data(ms.Tensor(w, base.weight.dtype))
    base.lora = None


def full_part(part: LoRAPart, tensor: str, tp: int, rank: int, value: np.ndarray) -> np.ndarray:
    """This rank's shard of a full ``lora_A`` / ``lora_B`` value (``tensor``) for ``part``."""
    dim = part.shard_dims[tensor]
    return value if dim is None else shard(value, tp, rank, dim)
