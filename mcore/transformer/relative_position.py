"""T5's relative position bias: a learned scalar per (head, distance bucket) added to the scores.

``relative_position_bucket(rel, bidirectional, num_buckets, max_distance)`` maps the relative
position ``rel = key_pos - query_pos`` (int32 Tensor) to a bucket in ``[0, num_buckets)``:

- bidirectional (encoder): half the buckets for ``rel > 0`` (offset ``num_buckets / 2``), half
  for ``rel <= 0``, on ``|rel|``; unidirectional (decoder, causal): ``max(-rel, 0)`` (keys after
  the query all fall in bucket 0, which the causal mask hides anyway);
- with ``B`` the buckets of one side and ``E = B / 2``: distances ``< E`` each get their own
  bucket; larger ones share logarithmically wider buckets
  ``E + int(ln(d / E) / ln(max_distance / E) * (B - E))``, capped at ``B - 1`` (every distance
  from about ``max_distance`` on shares the last bucket). Computed in float32 as T5 does, on
  the host (``distance_buckets``), then gathered.

``RelativePositionBias(num_heads, num_buckets, max_distance, bidirectional, tp_group)`` holds the
table ``weight [num_buckets, num_heads / tp]`` (Hugging Face's ``relative_attention_bias``
Embedding, split over tp on the head dim: each rank holds its own heads' columns, so gradients
need no reduction); ``bias(s, t, offset=0) -> [1, num_heads / tp, s, t]`` for queries at
positions ``offset .. offset + s - 1`` against keys ``0 .. t - 1``: the input of
``CoreAttention``'s additive ``bias``. T5 computes it in its first layer and shares it with the
others (``mcore.transformer.encoder_decoder`` does).
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops

from mcore.parallel_state import ProcessGroup
from mcore.tensor_parallel.layers import divide
from mcore.tensor_parallel.random import init_shard, name_seed


def distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """The bucket (int32) of each distance ``0 .. max_distance`` for ``num_buckets`` buckets of
    one side; every longer distance falls in the last bucket. Computed on the host in float32
    (``ln(d / E) / ln(max_distance / E) * (B - E)``, each step rounded to float32, then
    truncated), which reproduces T5's reference bucket for bucket, boundaries included (a
    device ``log`` that is off by one ulp moves exact boundaries such as ``d = 2 E``)."""
    exact = num_buckets // 2
    dist = np.arange(max_distance + 1)
    with np.errstate(divide="ignore"):
        log = np.log(dist.astype(np.float32) / np.float32(exact))  # -inf at 0: exact there
    large = np.float32(exact) + (log / np.float32(math.log(max_distance / exact))
                                 * np.float32(num_buckets - exact))
    large = np.minimum(np.where(dist < exact, 0, large).astype(np.int64), num_buckets - 1)
    return np.where(dist < exact, dist, large).astype(np.int32)


def relative_position_bucket(rel, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128, table=None):
    """Bucket ids (int32, same shape as ``rel``) of relative positions ``rel`` (int32 Tensor);
    see the module docstring. ``table``: ``distance_buckets`` of one side as an int32 Tensor
    (None = built here on the host; a Cell passes its own so that it compiles)."""
    if bidirectional:
        num_buckets //= 2
        side = (rel > 0).astype(ms.int32) * num_buckets
        dist = ops.abs(rel)
    else:
        side = ops.zeros_like(rel)
        dist = ops.maximum(-rel, ops.zeros_like(rel))
    if table is None:
        table = ms.Tensor(distance_buckets(num_buckets, max_distance))  # [max_distance + 1]
    dist = ops.minimum(dist, ops.full_like(dist, max_distance))
    return side + ops.gather(table, dist, 0)


class RelativePositionBias(nn.Cell):
    """See the module docstring; ``weight`` ``[num_buckets, num_heads / tp]``."""

    shard_dims = {"weight": 1}

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool,
                 tp_group: ProcessGroup | None = None, name: str = "relative_position_bias",
                 params_dtype=ms.float32):
        super().__init__()
        tp_group = tp_group or ProcessGroup.single("tp")
        if num_buckets < 2 or max_distance <= num_buckets // (4 if bidirectional else 2):
            raise ValueError(f"RelativePositionBias '{name}': num_buckets={num_buckets}, "
                             f"max_distance={max_distance}: need num_buckets >= 2 and "
                             "max_distance above the exact-bucket range")
        divide(num_heads, tp_group, "RelativePositionBias", name, "num_heads")
        self.num_buckets, self.max_distance = int(num_buckets), int(max_distance)
        self.bidirectional = bool(bidirectional)
        side = num_buckets // 2 if bidirectional else num_buckets
        self.table = ms.Tensor(distance_buckets(side, max_distance))  # [max_distance + 1]
        full_shape = (num_buckets, num_heads)
        self.weight = Parameter(ms.Tensor(init_shard(full_shape, name_seed(name), tp_group.size,
                                                     tp_group.rank, 1), params_dtype),
                                name=f"{name}.weight")

    def construct(self, s: int, t: int, offset=0):
        q_pos = ops.arange(0, s, 1, dtype=ms.int32).reshape(s, 1) + offset  # [s, 1]
        k_pos = ops.arange(0, t, 1, dtype=ms.int32).reshape(1, t)  # [1, t]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets,
                                           self.max_distance, self.table)  # [s, t]
        values = ops.gather(self.weight, buckets.reshape(-1), 0)  # [s t, n/tp]
        values = values.reshape(s, t, -1)  # [s t, n/tp] -> [s, t, n/tp]
        return ops.transpose(values, (2, 0, 1)).reshape(1, -1, s, t)  # -> [1, n/tp, s, t]
