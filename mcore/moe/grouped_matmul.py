"""grouped_matmul: one matmul per expert over the expert's consecutive rows, portable.

``grouped_matmul(x [N, in], w [E, in, out], tokens_per_expert) -> [N, out]``: rows
``[c_0 + .. + c_{e-1}, c_0 + .. + c_e)`` of ``x`` are multiplied by ``w[e]``; rows past
``sum(c)`` (dropped pairs) give zeros. Experts with no rows are fine. Two portable forms, the
same numbers, chosen by the type of ``tokens_per_expert``:

- Python ints (list / tuple): the rows are gathered into ``[E, M, in]`` (``M`` = the largest
  count, zero rows fill the rest), one batched matmul, and gathered back. Work ~ ``E * M``
  rows (``N`` when the load is balanced); one op instead of ``E`` small matmuls, which are
  slow in PyNative. Eager only (indices are built on the host from the counts).
- a Tensor ``[E]``: every row is multiplied by every expert's weight at once
  (``[N, in] x [in, E*out]``) and each row keeps its own expert's block. Static shapes, so it
  compiles under ``mindspore.jit``; costs ``E`` times the work (tests, small expert counts).

Both are differentiable w.r.t. ``x`` and ``w``. This is the composed reference of the fused
op "grouped_matmul" of ``mcore.fusions`` (on the CPU one OpenBLAS product per expert's rows,
either form of counts, compiling; ``GroupedMLP`` takes it through the registry);
``counts_tensor`` turns either form of counts into the kernel's int32 Tensor.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops


def _padded_form(x, w, counts):
    """Rows gathered into ``[E, M, in]`` (M = the largest count, zero rows fill), one batched
    matmul, rows gathered back. Indices are built on the host from the Python counts."""
    E, n_in, out = w.shape
    N = x.shape[0]
    M = max(max(counts), 1)
    slot = np.full((E, M), N, np.int32)  # row N = an appended zero row
    start = 0
    for e, n in enumerate(counts):
        slot[e, :n] = np.arange(start, start + n)
        start += n
    zero = ops.zeros((1, n_in), x.dtype)
    blocks = ops.gather(ops.cat([x, zero], 0), ms.Tensor(slot.reshape(-1)), 0)  # [E*M, in]
    y = ops.bmm(blocks.reshape(E, M, n_in), w).reshape(E * M, out)  # [E, M, in] x [E, in, out]
    back = np.full(N, E * M, np.int32)  # rows past the counted ones -> the zero row
    back[:start] = np.concatenate([e * M + np.arange(n) for e, n in enumerate(counts)])
    return ops.gather(ops.cat([y, ops.zeros((1, out), y.dtype)], 0), ms.Tensor(back), 0)


def row_expert(tokens_per_expert, num_rows: int):
    """Expert index of each row, ``[N]`` int32; rows past the total get ``E``."""
    ends = ops.cumsum(tokens_per_expert.astype(ms.float32), 0)  # [E]
    rows = ops.arange(num_rows, dtype=ms.float32).reshape(num_rows, 1)  # [N, 1]
    return (rows >= ends.reshape(1, -1)).astype(ms.int32).sum(-1)  # [N]


def _dense_form(x, w, tokens_per_expert):
    E, n_in, out = w.shape
    N = x.shape[0]
    owner = row_expert(tokens_per_expert, N)  # [N]
    select = ops.one_hot(owner, E + 1, ms.Tensor(1.0, x.dtype),
                         ms.Tensor(0.0, x.dtype))[:, :E]  # [N, E]
    flat_w = ops.transpose(w, (1, 0, 2)).reshape(n_in, E * out)  # [E, in, out] -> [in, E*out]
    every = ops.matmul(x, flat_w).reshape(N, E, out)  # [N, E, out]
    return (every * select.reshape(N, E, 1)).sum(1)  # [N, out]


def _checked(tokens_per_expert, num_experts: int, num_rows: int) -> list[int]:
    counts = [int(c) for c in tokens_per_expert]
    if len(counts) != num_experts or sum(counts) > num_rows or min(counts, default=0) < 0:
        raise ValueError(f"grouped_matmul: tokens_per_expert {counts} must have {num_experts} "
                         f"entries >= 0 summing to at most {num_rows} rows")
    return counts


def counts_tensor(tokens_per_expert, num_experts: int, num_rows: int):
    """``tokens_per_expert`` (Python ints, checked as ``grouped_matmul`` does, or a Tensor) as
    an int32 Tensor ``[E]``."""
    if isinstance(tokens_per_expert, (list, tuple)):
        return ms.Tensor(_checked(tokens_per_expert, num_experts, num_rows), ms.int32)
    return tokens_per_expert.astype(ms.int32)


def grouped_matmul(x, w, tokens_per_expert):
    """See the module docstring."""
    if isinstance(tokens_per_expert, (list, tuple)):
        return _padded_form(x, w, _checked(tokens_per_expert, w.shape[0], x.shape[0]))
    return _dense_form(x, w, tokens_per_expert)
