"""Where a rank's local tensor sits in the global tensor (pure index arithmetic, no I/O).

A ``ShardSpec`` describes one local array: its ``local_shape``, the ``global_shape`` of the
logical (one-process) tensor, and its ``blocks``: rectangular regions copied between the two,
each ``Block(local_start, global_start, shape)``. A plain tensor-parallel shard is one block;
a fused parameter (q/k/v or gate/up concatenated along the split dim, each part split over tp
separately, ``mcore.tensor_parallel.sharding``) is one block per part; a stacked expert
parameter adds the expert-parallel offset on dim 0. The blocks of one spec never overlap, and
the union of all ranks' blocks covers the global tensor.

``shard_spec`` builds the spec from what a layer knows: its split dim, the group size and rank,
the part sizes (global extents along the split dim) and the expert-parallel offset.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """``local[local_start : local_start + shape] == global[global_start : global_start + shape]``."""

    local_start: tuple[int, ...]
    global_start: tuple[int, ...]
    shape: tuple[int, ...]

    def to_json(self) -> list:
        return [list(self.local_start), list(self.global_start), list(self.shape)]

    @classmethod
    def from_json(cls, obj) -> "Block":
        return cls(*(tuple(int(x) for x in part) for part in obj))


@dataclass(frozen=True)
class ShardSpec:
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    blocks: tuple[Block, ...]

    @classmethod
    def whole(cls, shape) -> "ShardSpec":
        """A tensor held entirely (replicated or unsplit): one block, local == global."""
        shape = tuple(int(s) for s in shape)
        zero = (0,) * len(shape)
        return cls(shape, shape, (Block(zero, zero, shape),))

    def key(self) -> str:
        """A string identifying the layout (equal specs: equal keys)."""
        return repr((self.local_shape, self.global_shape, self.blocks))

    def to_json(self) -> dict:
        return {"local_shape": list(self.local_shape), "blocks": [b.to_json() for b in self.blocks]}

    @classmethod
    def from_json(cls, obj: dict, global_shape) -> "ShardSpec":
        return cls(tuple(int(s) for s in obj["local_shape"]), tuple(int(s) for s in global_shape),
                   tuple(Block.from_json(b) for b in obj["blocks"]))


def shard_spec(local_shape, dim: int | None = None, size: int = 1, rank: int = 0,
               parts: list[int] | None = None, stack: tuple[int, int] | None = None) -> ShardSpec:
    """The spec of a local array of ``local_shape``.

    ``dim``/``size``/``rank``: split along ``dim`` over a group of ``size`` (this is shard
    ``rank``); ``None`` or ``size == 1``: not split. ``parts``: the GLOBAL extents along ``dim``
    of the fused parts (default: one part), each split over the group separately, so the local
    array is ``[part0_r; part1_r; ...]`` along ``dim``. ``stack=(n_global, first)``: dim 0 is a
    stack of which this rank holds entries ``[first, first + local_shape[0])`` of ``n_global``.
    Raises ``ValueError`` when the parts do not divide by ``size`` or do not add up.
    """
    local_shape = tuple(int(s) for s in local_shape)
    global_shape = list(local_shape)
    base = [0] * len(local_shape)
    if stack is not None:
        global_shape[0], base[0] = int(stack[0]), int(stack[1])
    if dim is None or size == 1:
        return ShardSpec(local_shape, tuple(global_shape),
                         (Block((0,) * len(local_shape), tuple(base), local_shape),))
    dim = dim % len(local_shape)
    parts = [local_shape[dim] * size] if not parts else [int(p) for p in parts]
    if sum(parts) != local_shape[dim] * size:
        raise ValueError(f"parts {parts} do not add up to {local_shape[dim]} x {size} along dim {dim}")
    global_shape[dim] = sum(parts)
    blocks, local_at, global_at = [], 0, 0
    for part in parts:
        if part % size:
            raise ValueError(f"part of {part} along dim {dim} does not divide by {size}")
        n = part // size
        lstart, gstart, shape = [0] * len(local_shape), list(base), list(local_shape)
        lstart[dim], gstart[dim], shape[dim] = local_at, global_at + rank * n, n
        blocks.append(Block(tuple(lstart), tuple(gstart), tuple(shape)))
        local_at, global_at = local_at + n, global_at + part
    return ShardSpec(local_shape, tuple(global_shape), tuple(blocks))


def intersect(a_start, a_shape, b_start, b_shape):
    """``(start, shape)`` of the overlap of two global regions, or None."""
    start = tuple(max(x, y) for x, y in zip(a_start, b_start))
    stop = tuple(min(x + n, y + m) for x, n, y, m in zip(a_start, a_shape, b_start, b_shape))
    if any(e <= s for s, e in zip(start, stop)):
        return None
    return start, tuple(e - s for s, e in zip(start, stop))


def region(start, shape) -> tuple[slice, ...]:
    """Index of the region ``[start, start + shape)``."""
    return tuple(slice(s, s + n) for s, n in zip(start, shape))

