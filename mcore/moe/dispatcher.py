"""Token dispatchers: move routed tokens to the ranks that hold their experts, and back.

One interface, over the expert-parallel group ``ep`` (``P`` ranks; rank ``r`` holds experts
``[r * El, (r + 1) * El)``, ``El = E / P``)::

    x_local, counts, handle = dispatcher.dispatch(x [T, h], experts [T, k])
    y_local = experts_module(x_local, counts)                      # rows grouped by local expert
    y = dispatcher.combine(y_local, weights [T, k], handle)        # [T, h]

``y[t] = sum_j weights[t, j] * expert_{experts[t, j]}(x[t])`` summed over every rank's experts;
dropped pairs (expert id ``E``) contribute nothing. Both are differentiable (the collectives
carry their adjoint ``bprop``), and with ``P = 1`` they are plain ``permute`` / ``unpermute``.

- ``AllGatherDispatcher``: every rank gathers all tokens and routings of the group, keeps the
  pairs of its own experts, and the partial outputs are summed back by a reduce-scatter.
  Static shapes (``P * T * k`` rows, dropped and foreign pairs at the end): runs under
  ``mindspore.jit``; every rank's ``T`` must be equal.
- ``AllToAllDispatcher``: each rank sorts its pairs by expert, the per-expert counts are
  exchanged first (an all-gather of ``[E]``), then each rank sends every peer only the rows of
  that peer's experts (an uneven all-to-all, composed as in ``mcore.comm.all_to_all_uneven``:
  chunks padded to the group's largest, one equal all-to-all, padding stripped) and the
  received rows are regrouped by local expert. Counts are read on the host: eager only.
  ``mcore.comm.all_to_all_uneven`` itself is not used because it has no backward and slices
  empty chunks, which MindSpore's CPU autograd rejects; here every gather and the
  all-to-all work on non-empty buffers (``counts`` always leave one zero row at the end).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from mcore.comm import (DifferentiableAllGather, DifferentiableAllToAll,
                        DifferentiableReduceScatter, all_gather)
from mcore.moe.permute import Permutation
from mcore.parallel_state import ProcessGroup


def _local_range(num_experts: int, ep: ProcessGroup):
    if num_experts % ep.size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the ep group size "
                         f"{ep.size}")
    per = num_experts // ep.size
    return ep.rank * per, per


class AllGatherDispatcher(nn.Cell):
    """See the module docstring. ``counts``: a Tensor ``[El]``."""

    def __init__(self, num_experts: int, ep: ProcessGroup, fused: bool | None = None):
        super().__init__()
        self.first, self.num_local = _local_range(num_experts, ep)
        self.ep = ep
        self.permutation = Permutation(self.num_local, fused)
        self.gather_x = DifferentiableAllGather(ep, 0)
        self.gather_w = DifferentiableAllGather(ep, 0)
        self.scatter_y = DifferentiableReduceScatter(ep, 0)

    def dispatch(self, x, experts):
        x_all = self.gather_x(x)  # [T, h] -> [P*T, h]
        experts_all = all_gather(experts, self.ep, 0)  # [P*T, k]
        local = experts_all - self.first
        foreign = ops.logical_or(local < 0, local >= self.num_local)
        local = ops.where(foreign, ops.fill(ms.int32, local.shape, self.num_local), local)
        x_local, counts, order = self.permutation.permute(x_all, local)  # [P*T*k, h]
        mine = ops.logical_not(foreign).astype(ms.float32)  # [P*T, k]: pairs computed here
        return x_local, counts, (order, mine)

    def combine(self, y_local, weights, handle):
        order, mine = handle
        weights_all = self.gather_w(weights) * mine  # [T, k] -> [P*T, k], others' pairs 0
        y_all = self.permutation.unpermute(y_local, order, weights_all)  # [P*T, h] partial sums
        return self.scatter_y(y_all)  # sum over ranks, own [T, h]


class AllToAllDispatcher(nn.Cell):
    """See the module docstring. ``counts``: a list of ``El`` Python ints. Eager only."""

    def __init__(self, num_experts: int, ep: ProcessGroup, fused: bool | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.first, self.num_local = _local_range(num_experts, ep)
        self.ep = ep
        self.permutation = Permutation(num_experts, fused)
        self.a2a_forward = DifferentiableAllToAll(ep, 0, 0)
        self.a2a_backward = DifferentiableAllToAll(ep, 0, 0)

    def _plan(self, counts):
        """Host-side index plan from this rank's per-expert counts (one all-gather)."""
        P, El, me = self.ep.size, self.num_local, self.ep.rank
        mine = counts.astype(ms.float32).reshape(1, self.num_experts)  # [1, E]
        table = np.rint(all_gather(mine, self.ep, 0).asnumpy()).astype(np.int64)  # [P_src, E]
        table = table.reshape(P, P, El)  # [src, dst, local expert]
        pad = max(1, int(table.sum(-1).max()))  # largest chunk any rank sends any rank
        # send buffer: chunk for dst j = my sorted rows of j's experts, then padding (row N)
        send_sizes = table[me].sum(-1)  # [P]
        starts = np.concatenate([[0], np.cumsum(send_sizes)[:-1]])
        return table, pad, send_sizes, starts

    def dispatch(self, x, experts):
        P, El, me = self.ep.size, self.num_local, self.ep.rank
        x_sorted, counts, order = self.permutation.permute(x, experts)  # [N, h]
        N, h = x_sorted.shape
        table, pad, send_sizes, starts = self._plan(counts)
        send_idx = np.full((P, pad), N, np.int32)  # row N = the appended zero row
        for j in range(P):
            send_idx[j, :send_sizes[j]] = starts[j] + np.arange(send_sizes[j])
        zero = ops.zeros((1, h), x_sorted.dtype)
        buffer = ops.gather(ops.cat([x_sorted, zero], 0), ms.Tensor(send_idx.reshape(-1)), 0)
        received = self.a2a_forward(buffer)  # [P*pad, h]: chunk j came from rank j
        # regroup by local expert: for e, for src j, the rows j sent for expert e
        recv = table[:, me, :]  # [src, local expert]
        within = np.concatenate([np.zeros((P, 1), np.int64), np.cumsum(recv, 1)[:, :-1]], 1)
        rows = [j * pad + within[j, e] + np.arange(recv[j, e]) for e in range(El) for j in range(P)]
        local_idx = np.concatenate(rows + [[P * pad]]).astype(np.int32)  # + one zero row
        x_local = ops.gather(ops.cat([received, zero], 0), ms.Tensor(local_idx), 0)
        local_counts = [int(c) for c in recv.sum(0)]
        handle = (order, N, send_idx, local_idx, pad)
        return x_local, local_counts, handle

    def combine(self, y_local, weights, handle):
        order, N, send_idx, local_idx, pad = handle
        P, h = self.ep.size, y_local.shape[1]
        # back to the received layout [P*pad, h]: slot s of the buffer <- row of y_local
        back = np.full(P * pad, local_idx.shape[0] - 1, np.int32)  # default: the zero row
        real = local_idx[:-1]
        back[real] = np.arange(real.shape[0], dtype=np.int32)
        zero = ops.zeros((1, h), y_local.dtype)
        # the dummy last row made exactly zero by a mask (a slice would be empty when nothing
        # arrived, and MindSpore's CPU slice gradient fails on empty slices)
        keep = np.ones((local_idx.shape[0], 1), np.float32)
        keep[-1] = 0.0
        y_last_zero = y_local * ms.Tensor(keep, y_local.dtype)
        returned = self.a2a_backward(ops.gather(y_last_zero, ms.Tensor(back), 0))  # [P*pad, h]
        # sorted row i was sent as slot position send_pos[i]; dropped rows -> zero row
        send_pos = np.full(N, P * pad, np.int32)
        flat = send_idx.reshape(-1)
        sent = flat < N
        send_pos[flat[sent]] = np.nonzero(sent)[0].astype(np.int32)
        y_sorted = ops.gather(ops.cat([returned, zero], 0), ms.Tensor(send_pos), 0)  # [N, h]
        return self.permutation.unpermute(y_sorted, order, weights)
