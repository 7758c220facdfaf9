"""grouped_matmul: one matmul per expert over the expert's consecutive rows, portable.

``grouped_matmul(x [N, in], w [E, in, out], tokens_per_expert) -> [N, out]``: rows
``[c_0 + .. + c_{e-1}, c_0 + .. + c_e)`` of ``x`` are multiplied by ``w[e]``; rows past
``sum(c)`` (dropped pairs) give zeros. Experts with no rows are fine. Two portable forms, the
same numbers, chosen by the type of ``tokens_per_expert``:

- Python ints (list / tuple): split the rows by the counts, ``E`` small matmuls, concatenate.
  Work ~ one matmul of ``N`` rows. Eager only (the counts are read on the host).
- a Tensor ``[E]``: every row is multiplied by every expert's weight at once
  (``[N, in] x [in, E*out]``) and each row keeps its own expert's block. Static shapes, so it
  compiles under ``mindspore.jit``; costs ``E`` times the work (tests, small expert counts).

Both are differentiable w.r.t. ``x`` and ``w``. A fused device kernel (Ascend
``grouped_matmul``) belongs in ``mcore/fusions`` behind the same signature (not wired yet).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops


def _split_form(x, w, counts):
    E, _, out = w.shape
    total = sum(counts)
    pieces, start = [], 0
    for e in range(E):
        n = counts[e]
        if n:
            pieces.append(ops.matmul(x[start:start + n], w[e]))  # [n, in] x [in, out]
        start += n
    if total < x.shape[0]:
        pieces.append(ops.zeros((x.shape[0] - total, out), x.dtype))
    if not pieces:
        return ops.zeros((x.shape[0], out), x.dtype)
    return ops.cat(pieces, axis=0) if len(pieces) > 1 else pieces[0]


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


def grouped_matmul(x, w, tokens_per_expert):
    """See the module docstring."""
    if isinstance(tokens_per_expert, (list, tuple)):
        counts = [int(c) for c in tokens_per_expert]
        if len(counts) != w.shape[0] or sum(counts) > x.shape[0] or min(counts, default=0) < 0:
            raise ValueError(f"grouped_matmul: tokens_per_expert {counts} must have {w.shape[0]} "
                             f"entries >= 0 summing to at most {x.shape[0]} rows")
        return _split_form(x, w, counts)
    return _dense_form(x, w, tokens_per_expert)
