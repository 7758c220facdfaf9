"""Absolute position schemes older decoders use instead of rotary embeddings.

- ``LearnedPositionEmbedding``: a table ``weight [max_positions, h]`` of one learned vector per
  absolute position, added to the token embedding (GPT-2, GPTBigCode). Replicated over tp
  (it is small); positions ``[b, s]`` -> ``[b, s, h]``.
- ``alibi_slopes(num_heads)``: the ALiBi head slopes (Press et al., "Train Short, Test Long").
  For ``n`` a power of two, head ``i`` (1-based) has slope ``2 ** (-8 i / n)``; otherwise the
  ``p`` = largest power of two below ``n`` heads get those slopes for ``p`` and the remaining
  ``n - p`` heads take every other slope of the ``2 p`` sequence (odd terms). Attention adds
  ``slope_head * (key_pos - query_pos)`` to the scaled scores (``mcore.fusions.attention``);
  within one query row this differs from Bloom's ``slope * key_pos`` by a constant, which the
  softmax removes. ``alibi_slopes_for_rank`` gives one tp rank's share (its query heads).
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops

from mcore.tensor_parallel.random import name_seed


def alibi_slopes(num_heads: int) -> np.ndarray:
    """``[num_heads]`` float32 ALiBi slopes (see the module docstring)."""
    if num_heads <= 0:
        raise ValueError(f"alibi_slopes: num_heads={num_heads} must be > 0")
    p = 2 ** int(math.floor(math.log2(num_heads)))
    base = 2.0 ** (-8.0 / p)  # the slope of head 1 when there are p heads
    slopes = [base ** i for i in range(1, p + 1)]
    if p != num_heads:
        extra = 2.0 ** (-8.0 / (2 * p))
        slopes += [extra ** i for i in range(1, 2 * (num_heads - p), 2)]
    return np.asarray(slopes, np.float32)


def alibi_slopes_for_rank(num_heads: int, tp: int, rank: int) -> np.ndarray:
    """The slopes of tp rank ``rank``'s query heads ``[rank n/tp, (rank + 1) n/tp)``."""
    if num_heads % tp:
        raise ValueError(f"alibi: num_attention_heads={num_heads} is not divisible by tensor "
                         f"parallel size {tp}")
    local = num_heads // tp
    return alibi_slopes(num_heads)[rank * local:(rank + 1) * local]


class LearnedPositionEmbedding(nn.Cell):
    """Absolute position table ``weight [max_positions, hidden_size]`` (initial values
    N(0, 0.02) from a seed derived from ``name``). ``positions [b, s]`` (int) ->
    ``[b, s, hidden_size]``. Positions must lie in ``[0, max_positions)``."""

    def __init__(self, max_positions: int, hidden_size: int, dtype=ms.float32,
                 name: str = "position_embedding"):
        super().__init__()
        rng = np.random.default_rng(name_seed(name))
        table = rng.normal(0.0, 0.02, (max_positions, hidden_size)).astype(np.float32)
        self.max_positions = max_positions
        self.weight = Parameter(ms.Tensor(table, dtype), name=f"{name}.weight")

    def construct(self, positions):
        return ops.gather(self.weight, positions, 0)  # [b, s] -> [b, s, h]
