"""Split full weights into tensor-parallel shards and merge them back (numpy, no communication).

Used by layers at initialisation, by checkpoints and by the Hugging Face adapters. A weight of
full size ``n`` along ``dim`` is split into ``tp_size`` equal, contiguous shards; shard ``r``
holds ``[r * n / tp_size, (r + 1) * n / tp_size)``. ``merge`` is the inverse (concatenation in
rank order). Both accept numpy arrays or MindSpore tensors and return numpy arrays.

Where each ``mcore.tensor_parallel`` layer splits its parameters (``Cell.shard_dims``):

=========================  ===============  ===================  =============
layer                      weight shape     weight split dim     bias
=========================  ===============  ===================  =============
ColumnParallelLinear       [out, in]        0 (out)              0 (out)
RowParallelLinear          [out, in]        1 (in)               replicated
VocabParallelEmbedding     [vocab, h]       0 (vocab, padded)    --
=========================  ===============  ===================  =============
"""
from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    """A numpy view/copy of ``x`` (numpy array or MindSpore tensor)."""
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def shard_size(n: int, tp_size: int, what: str = "tensor") -> int:
    """``n / tp_size``, or a ``ValueError`` naming ``what`` and both sizes."""
    if tp_size < 1 or n % tp_size:
        raise ValueError(f"{what}: size {n} is not divisible by tp size {tp_size}")
    return n // tp_size


def shard(full, tp_size: int, tp_rank: int, dim: int) -> np.ndarray:
    """Shard ``tp_rank`` of ``full`` split in ``tp_size`` equal parts along ``dim`` (a copy).

    [.., n, ..] -> [.., n / tp_size, ..]
    """
    full = to_numpy(full)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"shard: tp_rank {tp_rank} is not in [0, {tp_size})")
    dim = dim % full.ndim
    n = shard_size(full.shape[dim], tp_size, f"shard of shape {full.shape} on dim {dim}")
    index = (slice(None),) * dim + (slice(tp_rank * n, (tp_rank + 1) * n),)
    return np.ascontiguousarray(full[index])


def merge(shards, dim: int) -> np.ndarray:
    """Concatenate the shards of all tp ranks (rank order) along ``dim``: inverse of ``shard``."""
    return np.concatenate([to_numpy(s) for s in shards], axis=dim)


def padded_size(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def pad(full, size: int, dim: int = 0) -> np.ndarray:
    """``full`` extended with zeros along ``dim`` to ``size`` (e.g. a vocabulary padded so that
    it divides by tp). Merged shards of a padded weight are trimmed with ``[:n]``."""
    full = to_numpy(full)
    dim = dim % full.ndim
    extra = size - full.shape[dim]
    if extra < 0:
        raise ValueError(f"pad: size {size} is smaller than dimension {dim} ({full.shape[dim]})")
    widths = [(0, 0)] * full.ndim
    widths[dim] = (0, extra)
    return np.pad(full, widths) if extra else full
