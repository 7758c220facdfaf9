"""The global gradient norm with every parameter counted once, whatever its layout.

``GlobalGradNorm(buckets, dims)(grads) -> norm``: ``sqrt`` of the sum of squares of all the
model's gradients, the same on every rank. ``buckets[i]`` says where gradient ``i``'s squares
are summed (``mcore.distributed.finalize.GradPlan.norm``):

- ``"local"``: replicated over tp (and over dp, ep, ...): this rank's squares are the
  parameter's, counted as they are;
- ``"tp"``: split over tp: the shards' squares summed over tp;
- ``"expert"``: an expert's weights, each expert on one ep rank: summed over ep;
- ``"expert_etp"``: experts split over etp as well: summed over etp, then over ep;
- ``None``: left out (the head copy of a tied embedding).

Then the total is summed over the pp group (each stage holds different parameters). The data
parallel copies (dp, edp) hold equal reduced gradients and are never summed. Collectives, in
this order, each only when its group has more than one rank and its bucket has members:
tp, etp, ep, then pp.

Each gradient's sum of squares is the ``squared_norm`` op of ``mcore.fusions`` (on the CPU a
kernel summing fixed blocks in a fixed order, independent of the thread count; else
``(g * g).sum()``), chosen when the Cell is built.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from mcore.comm.collectives import all_reduce
from mcore.fusions.registry import fused_cell
from mcore.parallel_state import ParallelDims

BUCKETS = ("local", "tp", "expert", "expert_etp", None)


class SquareSum(nn.Cell):
    """``(g * g).sum()``: the composed reference of the ``squared_norm`` op."""

    def construct(self, g):
        return (g * g).sum()


class GlobalGradNorm(nn.Cell):
    """``construct(grads) -> norm`` (fp32 scalar); see the module docstring."""

    def __init__(self, buckets: list, dims: ParallelDims):
        super().__init__()
        bad = [b for b in buckets if b not in BUCKETS]
        if bad:
            raise ValueError(f"GlobalGradNorm: unknown norm bucket {bad[0]!r}, expected one of "
                             f"{BUCKETS}")
        self.buckets = tuple(buckets)
        self.square_sum = fused_cell("squared_norm") or SquareSum()
        self.tp, self.etp, self.ep, self.pp = dims.tp, dims.etp, dims.ep, dims.pp
        # a collective only for a bucket that has members (the same on every rank of a stage)
        self.sum_tp = dims.tp.size > 1 and "tp" in self.buckets
        self.sum_etp = dims.etp.size > 1 and "expert_etp" in self.buckets
        self.sum_ep = dims.ep.size > 1 and ("expert" in self.buckets
                                            or "expert_etp" in self.buckets)

    def construct(self, grads):
        local = ops.zeros((), ms.float32)
        tp = ops.zeros((), ms.float32)
        expert = ops.zeros((), ms.float32)
        expert_etp = ops.zeros((), ms.float32)
        for i in range(len(self.buckets)):
            b = self.buckets[i]
            if b is None:
                continue
            sq = self.square_sum(grads[i])
            if b == "local":
                local = local + sq
            elif b == "tp":
                tp = tp + sq
            elif b == "expert":
                expert = expert + sq
            else:
                expert_etp = expert_etp + sq
        if self.sum_tp:
            tp = all_reduce(tp, self.tp)
        if self.sum_etp:
            expert_etp = all_reduce(expert_etp, self.etp)
        if self.sum_ep:
            expert = all_reduce(expert + expert_etp, self.ep)
        else:
            expert = expert + expert_etp
        total = local + tp + expert
        if self.pp.size > 1:
            total = all_reduce(total, self.pp)
        return ops.sqrt(total)
