"""Collectives on a ``ProcessGroup`` that run on CPU, GPU and Ascend, in PyNative and in jit.

Every function returns its input unchanged (no communication) when the group has size one.
``dim`` arguments name the tensor dimension that is gathered / scattered. Gradients: these are
plain forward functions; the differentiable forms live in ``mcore.comm.autograd``.

Kernels: the SUM all-reduce is MindSpore's ``AllReduce`` on every device. Where the device
has no native kernel (``group.native`` is False, e.g. CPU; see ``mcore.comm.backend``) these
are composed from it (``P`` = group size):

- all_gather: each rank writes its slice into a zero buffer of ``P`` slices, then SUM. Exact.
- reduce_scatter: SUM, then each rank keeps its own slice.
- all_to_all: all_gather of the whole input, then each rank picks the chunks addressed to it.

and with ``group.native`` these three use ``AllGather`` / ``ReduceScatter`` / ``AlltoAll``.
Composed on EVERY device, native or not:

- broadcast: non-source ranks contribute zeros to a SUM. Exact.
- max / min: all_gather of the inputs stacked on a new axis, then a local max / min. Exact.
- barrier: a SUM of one zero.
- all_to_all_uneven: counts padded to the largest, then ``all_to_all``, then stripped.

Integer tensors go through float32 on CPU (the SUM all-reduce kernel is float only), which is
exact for magnitudes below 2**24.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mcore.parallel_state import ProcessGroup


def narrow(x, dim: int, start: int, length: int):
    """``x`` restricted to ``[start, start + length)`` along ``dim`` (plain slicing: jit-safe,
    also inside a ``bprop``)."""
    dim = dim % x.ndim
    index = (slice(None),) * dim + (slice(start, start + length),)
    return x[index]


def zeros_of(x):
    """Zeros shaped like ``x``. (``ops.zeros_like`` breaks jit compilation when one function
    runs in both a forward and a ``bprop`` of the same graph: "func graph is empty".)"""
    return ops.zeros(x.shape, x.dtype)


def _float_in(x):
    return x if x.dtype in (ms.float32, ms.float16) else x.astype(ms.float32)


def _sum(x, group: ProcessGroup):
    y = ops.AllReduce(group=group.comm_name)(_float_in(x))
    return y if y.dtype == x.dtype else y.astype(x.dtype)


def all_reduce(x, group: ProcessGroup, op: str = "sum"):
    """Reduce ``x`` over the group; every rank gets the result. ``op``: sum, max or min."""
    if group.size == 1:
        return x
    if op == "sum":
        return _sum(x, group)
    if op not in ("max", "min"):
        raise ValueError(f"all_reduce: op must be 'sum', 'max' or 'min', got {op!r}")
    stacked = all_gather(ops.expand_dims(x, 0), group, dim=0)  # [P, *x.shape]
    return stacked.max(axis=0) if op == "max" else stacked.min(axis=0)


def all_gather(x, group: ProcessGroup, dim: int = 0):
    """Concatenate every rank's ``x`` along ``dim`` in group order: [.., n, ..] -> [.., P*n, ..]."""
    if group.size == 1:
        return x
    if group.native:
        dim = dim % x.ndim
        moved = ops.moveaxis(x, dim, 0) if dim else x
        out = ops.AllGather(group=group.comm_name)(moved)  # [P*n, ...] along axis 0
        return ops.moveaxis(out, 0, dim) if dim else out
    zeros = zeros_of(x)
    parts = []
    for i in range(group.size):
        parts.append(x if i == group.rank else zeros)
    return _sum(ops.cat(parts, axis=dim), group)


def _check_divisible(x, group: ProcessGroup, dim: int, what: str):
    n = x.shape[dim]
    if n % group.size:
        raise ValueError(f"{what}: dimension {dim} of size {n} is not divisible by the "
                         f"{group.kind} group size {group.size}")
    return n // group.size


def reduce_scatter(x, group: ProcessGroup, dim: int = 0):
    """SUM over the group, each rank keeping its own 1/P slice along ``dim``: [P*n] -> [n]."""
    if group.size == 1:
        return x
    chunk = _check_divisible(x, group, dim, "reduce_scatter")
    if group.native:
        dim = dim % x.ndim
        moved = ops.moveaxis(x, dim, 0) if dim else x
        out = ops.ReduceScatter(group=group.comm_name)(moved)
        return ops.moveaxis(out, 0, dim) if dim else out
    return narrow(_sum(x, group), dim, group.rank * chunk, chunk)


def all_to_all(x, group: ProcessGroup, split_dim: int = 0, concat_dim: int = 0):
    """Split ``x`` into P equal chunks along ``split_dim``; chunk j goes to rank j; the chunks
    received from ranks 0..P-1 are concatenated along ``concat_dim``."""
    if group.size == 1:
        return x
    _check_divisible(x, group, split_dim, "all_to_all")
    if group.native:
        return ops.AlltoAll(group.size, split_dim % x.ndim, concat_dim % x.ndim,
                            group=group.comm_name)(x)
    split_dim, concat_dim = split_dim % x.ndim, concat_dim % x.ndim
    gathered = all_gather(ops.expand_dims(x, 0), group, dim=0)  # [P_src, *x.shape]
    return all_to_all_from_gathered(gathered, x.shape, group, split_dim, concat_dim)


def all_to_all_from_gathered(gathered, shape, group: ProcessGroup, split_dim: int,
                             concat_dim: int):
    """The composed ``all_to_all``'s result from ``gathered [P_src, *shape]`` (every rank's
    input, stacked): this rank's chunk of each source, concatenated along ``concat_dim``.
    ``split_dim`` / ``concat_dim`` are non-negative."""
    chunk = shape[split_dim] // group.size
    mine = narrow(gathered, split_dim + 1, group.rank * chunk, chunk)  # [P_src, *chunk_shape]
    # [P_src, ..., c_k, ...] -> [..., P_src, c_k, ...] -> [..., P_src * c_k, ...]
    moved = ops.moveaxis(mine, 0, concat_dim)
    out = list(shape)
    out[split_dim] = chunk
    out[concat_dim] = out[concat_dim] * group.size
    return moved.reshape(tuple(out))


def all_to_all_uneven(x, group: ProcessGroup, send_counts: list[int],
                      recv_counts: list[int] | None = None):
    """All-to-all along dim 0 with unequal counts (PyNative: counts are Python ints).

    ``send_counts[j]`` rows of ``x`` (consecutive, in rank order) go to rank j;
    ``recv_counts[j]`` rows arrive from rank j (gathered from the peers when not given).
    Composition: counts are padded to the group-wide maximum, exchanged with ``all_to_all``,
    and the padding is stripped.
    """
    if len(send_counts) != group.size or sum(send_counts) != x.shape[0]:
        raise ValueError(f"all_to_all_uneven: send_counts {list(send_counts)} must have "
                         f"{group.size} entries summing to dim 0 of the input ({x.shape[0]})")
    if recv_counts is None:
        counts = ms.Tensor([list(send_counts)], ms.float32)  # [1, P]
        table = all_gather(counts, group, dim=0).asnumpy().astype(int)  # [P_src, P_dst]
        recv_counts = [int(c) for c in table[:, group.rank]]
    if group.size == 1:
        return x
    pad_to = int(all_reduce(ms.Tensor([max(send_counts)], ms.float32), group, "max").asnumpy()[0])
    rest = tuple(x.shape[1:])
    padded, start = [], 0
    for n in send_counts:
        piece = x[start:start + n]
        if n < pad_to:
            piece = ops.cat([piece, ops.zeros((pad_to - n,) + rest, x.dtype)], axis=0)
        padded.append(piece)
        start += n
    received = all_to_all(ops.cat(padded, axis=0), group, 0, 0)  # [P * pad_to, ...]
    parts = [received[j * pad_to: j * pad_to + n] for j, n in enumerate(recv_counts)]
    return ops.cat(parts, axis=0)


def broadcast(x, group: ProcessGroup, src: int = 0):
    """Every rank gets the ``x`` of group rank ``src``."""
    if group.size == 1:
        return x
    if not 0 <= src < group.size:
        raise ValueError(f"broadcast: src {src} is not a rank of the {group.kind} group "
                         f"(size {group.size})")
    return _sum(x if group.rank == src else zeros_of(x), group)


def barrier(group: ProcessGroup):
    """Return only when every rank of the group has reached this call."""
    if group.size > 1:
        _sum(ops.zeros((1,), ms.float32), group).asnumpy()
