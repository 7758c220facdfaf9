"""Bucket and shard arithmetic of the distributed optimizer (pure Python, no MindSpore).

    layout = bucket_layout([(name, shape), ...], dp=2, bucket_size=4_000_000)
    layout.buckets[b].shard_size              # elements of bucket b each rank owns
    layout.pieces(rank)                       # [Piece(name, shape, param_offset, length, ...)]

Parameters are laid end to end, in the order given, into contiguous flat buckets; a bucket is
closed once it holds at least ``bucket_size`` elements (a parameter is never cut between two
buckets, so a parameter larger than ``bucket_size`` fills a bucket of its own). Each bucket is
padded with zeros at its end to ``padded = ceil(numel / dp) * dp`` elements and split into
``dp`` contiguous shards of ``shard_size = padded / dp``: data-parallel rank ``r`` owns the
elements ``[r * shard_size, (r + 1) * shard_size)`` of every bucket.

A ``Piece`` describes, for one rank, the part of one parameter that falls in its shard: the
elements ``[param_offset, param_offset + length)`` of the row-major flattened parameter (global
shape ``shape``) sit at ``[shard_offset, shard_offset + length)`` of the rank's shard of bucket
``bucket``. Over the ``dp`` ranks the pieces of a parameter cover it exactly once; that is what a
checkpoint records (flat pieces, ``mcore.checkpoint``) so that the moments can be resharded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_BUCKET_SIZE = 4_000_000  # elements (16 MB of fp32)


@dataclass(frozen=True)
class Slot:
    """Where parameter ``name`` (``numel`` elements) starts in its bucket's flat buffer."""

    name: str
    shape: tuple[int, ...]
    numel: int
    offset: int


@dataclass(frozen=True)
class Bucket:
    """One flat buffer: ``slots`` end to end (``numel`` elements), zero padding up to ``padded``
    (a multiple of ``dp``), ``shard_size = padded / dp`` elements per rank."""

    slots: tuple[Slot, ...]
    numel: int
    padded: int
    shard_size: int


@dataclass(frozen=True)
class Piece:
    """The part of parameter ``name`` in one rank's shard of bucket ``bucket``; see the module
    docstring."""

    name: str
    shape: tuple[int, ...]
    bucket: int
    param_offset: int
    length: int
    shard_offset: int


@dataclass(frozen=True)
class BucketLayout:
    """Buckets of one rank's parameters, sharded over ``dp`` ranks."""

    buckets: tuple[Bucket, ...]
    dp: int

    def pieces(self, rank: int) -> list[Piece]:
        """The pieces of data-parallel rank ``rank``'s shards, bucket by bucket, in order."""
        if not 0 <= rank < self.dp:
            raise ValueError(f"rank {rank} is not in [0, dp={self.dp})")
        out = []
        for b, bucket in enumerate(self.buckets):
            lo, hi = rank * bucket.shard_size, (rank + 1) * bucket.shard_size
            for s in bucket.slots:
                start, end = max(lo, s.offset), min(hi, s.offset + s.numel)
                if start < end:
                    out.append(Piece(s.name, s.shape, b, start - s.offset, end - start, start - lo))
        return out

    @property
    def shard_elements(self) -> int:
        """Elements one rank owns over all buckets (padding included)."""
        return sum(b.shard_size for b in self.buckets)


def bucket_layout(params, dp: int, bucket_size: int = DEFAULT_BUCKET_SIZE) -> BucketLayout:
    """Lay ``params`` (``(name, shape)`` pairs, in order) into buckets of at least
    ``bucket_size`` elements (the last one may be smaller), each sharded over ``dp`` ranks."""
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    buckets, slots, filled = [], [], 0

    def close():
        padded = max(1, math.ceil(filled / dp)) * dp
        buckets.append(Bucket(tuple(slots), filled, padded, padded // dp))

    for name, shape in params:
        shape = tuple(int(d) for d in shape)
        numel = math.prod(shape)
        slots.append(Slot(name, shape, numel, filled))
        filled += numel
        if filled >= bucket_size:
            close()
            slots, filled = [], 0
    if slots:
        close()
    return BucketLayout(tuple(buckets), dp)
