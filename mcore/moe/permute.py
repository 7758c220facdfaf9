"""permute / unpermute: group the (token, expert) pairs of a routing by expert, and back.

A routing of ``T`` tokens is ``experts [T, k]`` (int32; ``E`` = dropped pair, see
``mcore.moe.routing``) and ``weights [T, k]``. Pair ``p = t * k + j`` is token ``t``'s j-th
choice; ``N = T * k`` pairs in all.

``permute(x [T, h], experts, E) -> (x_sorted [N, h], counts [E] int32, order [N] int32)``:
row ``i`` of ``x_sorted`` is the token of pair ``order[i]``; pairs are sorted by expert, then
by token, and dropped pairs come last, so rows ``[c_0 + .. + c_{e-1}, .. + c_e)`` belong to
expert ``e`` (the layout ``grouped_matmul`` expects). Shapes are static (``N`` rows always).

``unpermute(y_sorted [N, h], order, weights [T, k]) -> [T, h]``: ``sum_j weights[t, j] *
y(pair t*k + j)``. With unit weights and identity experts, ``unpermute(permute(x)) = k * x``
for a token with no dropped pair.

``Permutation(num_experts, fused=None)`` is the dispatchers' way in: its ``permute(x, experts)``
and ``unpermute(y_sorted, order, weights)`` compute the same through the fused ops
"moe_permute" / "moe_unpermute" of ``mcore.fusions`` where the registry has them (on the CPU a
counting sort and one pass over the rows each way; float32 rows), else through the functions
here (``fused=False``: always).

``pad_to_capacity`` / ``unpad_from_capacity`` turn ``x_sorted`` into exactly ``capacity`` rows
per expert (``[E * C, h]``, zero rows after each expert's own) and back.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from mcore.fusions.registry import fused_cell


def sort_pairs(experts, num_experts: int):
    """``(order [N] int32, counts [E] int32)`` of a routing (see the module docstring)."""
    N = experts.shape[0] * experts.shape[1]
    flat = experts.reshape(N)  # [T, k] -> [N]
    key = flat * N + ops.arange(N, dtype=ms.int32)  # unique: expert-major, then pair index
    order = ops.sort(key)[1].astype(ms.int32)  # [N]
    onehot = ops.one_hot(flat, num_experts + 1, ms.Tensor(1, ms.int32), ms.Tensor(0, ms.int32))
    return order, onehot.sum(0)[:num_experts]


def permute(x, experts, num_experts: int):
    """See the module docstring."""
    k = experts.shape[1]
    order, counts = sort_pairs(experts, num_experts)
    tokens = ops.floor_divide(order, k)  # [N]: token of each sorted pair
    return ops.gather(x, tokens, 0), counts, order  # [T, h] -> [N, h]


def unpermute(y_sorted, order, weights):
    """See the module docstring. The weights are cast to ``y_sorted``'s dtype."""
    T, k = weights.shape
    inverse = ops.sort(order)[1].astype(ms.int32)  # pair p sits at row inverse[p]
    y_pairs = ops.gather(y_sorted, inverse, 0).reshape(T, k, -1)  # [N, h] -> [T, k, h]
    w = weights.astype(y_sorted.dtype).reshape(T, k, 1)
    return (y_pairs * w).sum(1)  # [T, h]


# The composed functions under names of their own: in a compiled graph, a call of ``permute``
# inside the method ``Permutation.permute`` would resolve to the method.
_composed_permute, _composed_unpermute = permute, unpermute


class Permutation(nn.Cell):
    """See the module docstring."""

    def __init__(self, num_experts: int, fused: bool | None = None):
        super().__init__()
        self.num_experts = num_experts
        permute_kernel = fused_cell("moe_permute", fused, num_experts=num_experts)
        unpermute_kernel = fused_cell("moe_unpermute", fused)
        self.use_permute_kernel = permute_kernel is not None
        self.use_unpermute_kernel = unpermute_kernel is not None
        if self.use_permute_kernel:
            self.permute_kernel = permute_kernel
        if self.use_unpermute_kernel:
            self.unpermute_kernel = unpermute_kernel

    def permute(self, x, experts):
        """``(x_sorted [N, h], counts [E] int32, order [N] int32)``, as ``permute``."""
        if self.use_permute_kernel and x.dtype == ms.float32:
            return self.permute_kernel(x, experts.astype(ms.int32))
        return _composed_permute(x, experts, self.num_experts)

    def unpermute(self, y_sorted, order, weights):
        """``[T, h]``, as ``unpermute``."""
        if self.use_unpermute_kernel and y_sorted.dtype == ms.float32:
            return self.unpermute_kernel(y_sorted, order, weights.astype(ms.float32))
        return _composed_unpermute(y_sorted, order, weights)


def _slots(counts, capacity: int, num_rows: int):
    """Row of ``x_sorted`` feeding slot ``(e, j)``, flattened ``[E * C]``; ``num_rows`` (one
    past the end, a zero row) where expert ``e`` has fewer than ``j + 1`` rows."""
    E = counts.shape[0]
    c = counts.astype(ms.int32).reshape(E, 1)
    start = ops.cumsum(c, 0) - c  # [E, 1]
    j = ops.arange(capacity, dtype=ms.int32).reshape(1, capacity)  # [1, C]
    row = ops.where(j < c, start + j, ops.fill(ms.int32, (E, capacity), num_rows))
    return row.reshape(E * capacity)


def pad_to_capacity(x_sorted, counts, capacity: int):
    """``[N, h]`` grouped rows -> ``[E * C, h]``, each expert's rows then zeros."""
    zero = ops.zeros((1, x_sorted.shape[1]), x_sorted.dtype)
    source = ops.cat([x_sorted, zero], axis=0)  # [N + 1, h]
    return ops.gather(source, _slots(counts, capacity, x_sorted.shape[0]), 0)


def unpad_from_capacity(y_padded, counts, capacity: int, num_rows: int):
    """Inverse of ``pad_to_capacity``: ``[E * C, h]`` -> ``[num_rows, h]`` grouped rows (rows
    past ``sum(counts)`` are zero)."""
    E = counts.shape[0]
    c = counts.astype(ms.int32)
    start = ops.cumsum(c, 0) - c  # [E]
    rows = ops.arange(num_rows, dtype=ms.int32)  # [N]
    ends = ops.cumsum(c, 0)
    owner = (rows.reshape(-1, 1) >= ends.reshape(1, -1)).astype(ms.int32).sum(-1)  # [N]
    safe = ops.minimum(owner, E - 1)
    slot = safe * capacity + rows - ops.gather(start, safe, 0)  # [N]
    zero = ops.zeros((1, y_padded.shape[1]), y_padded.dtype)
    source = ops.cat([y_padded, zero], axis=0)  # [E*C + 1, h]
    slot = ops.where(owner < E, slot, ops.fill(ms.int32, (num_rows,), E * capacity))
    return ops.gather(source, slot, 0)
