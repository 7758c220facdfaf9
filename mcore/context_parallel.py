"""The load-balanced split of a sequence over the context-parallel (cp) group (host side, numpy).

With causal attention the late tokens of a sequence attend to many more keys than the early
ones, so cutting the sequence into ``cp`` contiguous pieces would give the last rank most of the
work. As in Megatron, the sequence of length ``s`` is cut into ``2 cp`` equal chunks of
``c = s / (2 cp)`` tokens and cp rank ``r`` holds chunk ``r`` followed by chunk ``2 cp - 1 - r``::

    s = 8, cp = 2:  chunks [0 1][2 3][4 5][6 7]
                    rank 0 holds positions 0 1 6 7, rank 1 holds 2 3 4 5

Every rank then holds ``s / cp`` tokens and the same causal work (the keys its queries see add
up to ``c (2 c cp + 1)`` on every rank). The split applies to everything indexed by the
position: input ids, labels, loss masks and the position ids the rotary (or learned) position
embedding reads (``cp_position_ids``: the positions this rank holds, not ``0 .. s/cp - 1``).
The attention schemes of ``mcore.transformer.context_parallel`` expect exactly this layout.

All functions are pure index arithmetic on the host; the training step splits each numpy batch
before it enters the compiled graph (``training.step``), so the model itself never sees cp.
"""
from __future__ import annotations

import numpy as np


def check_cp_sequence(seq_length: int, cp: int, what: str = "seq_length") -> None:
    """``ValueError`` naming ``what`` unless ``seq_length`` divides by ``2 * cp``."""
    if cp < 1:
        raise ValueError(f"context parallel size {cp} must be >= 1")
    if seq_length <= 0 or seq_length % (2 * cp):
        raise ValueError(f"{what}={seq_length}: must be a positive multiple of 2*cp={2 * cp} "
                         "(the load-balanced context-parallel split cuts it into 2*cp chunks)")


def cp_token_indices(seq_length: int, cp: int, rank: int) -> np.ndarray:
    """The positions (int64, ascending) of the ``seq_length / cp`` tokens cp rank ``rank``
    holds: chunk ``rank`` then chunk ``2 cp - 1 - rank`` of the ``2 cp`` equal chunks."""
    check_cp_sequence(seq_length, cp)
    if not 0 <= rank < cp:
        raise ValueError(f"cp rank {rank} is not in [0, {cp})")
    c = seq_length // (2 * cp)
    first = np.arange(rank * c, (rank + 1) * c, dtype=np.int64)
    second = np.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, dtype=np.int64)
    return np.concatenate([first, second])


def split_for_cp(x: np.ndarray, cp: int, rank: int, axis: int = 1) -> np.ndarray:
    """This rank's part of ``x`` along the sequence ``axis``: ``[b, s, ...] -> [b, s/cp, ...]``
    (a copy, in ``cp_token_indices`` order). ``cp == 1`` returns ``x`` unchanged."""
    if cp == 1:
        return x
    x = np.asarray(x)
    return np.take(x, cp_token_indices(x.shape[axis], cp, rank), axis=axis)


def cp_position_ids(batch: int, seq_length: int, cp: int, rank: int) -> np.ndarray:
    """The position ids ``[batch, seq_length / cp]`` (int32) of the tokens this rank holds
    (what ``GPTModel`` takes as ``position_ids`` for the rotary / learned positions)."""
    pos = cp_token_indices(seq_length, cp, rank).astype(np.int32)
    return np.broadcast_to(pos, (batch, pos.size)).copy()


def gather_from_cp(parts: list[np.ndarray], axis: int = 1) -> np.ndarray:
    """The inverse of ``split_for_cp``: the ``cp`` ranks' parts (rank order) -> the whole
    sequence along ``axis``."""
    cp = len(parts)
    s = parts[0].shape[axis] * cp
    out_shape = list(parts[0].shape)
    out_shape[axis] = s
    out = np.empty(out_shape, parts[0].dtype)
    for rank, part in enumerate(parts):
        index = [slice(None)] * out.ndim
        index[axis] = cp_token_indices(s, cp, rank)
        out[tuple(index)] = part
    return out
