"""The process groups of a mixture-of-experts layer and the token moves between them.

``MoEGroups`` is the same class as ``mcore.parallel_state.ModelGroups`` (kept as a name for
the MoE library). A MoE layer sits in a tensor-parallel model: its input ``x [b, s, h]`` is
replicated over ``tp`` (the dense grid tp, cp, dp, pp), while its experts live on the expert
grid (etp, ep, edp, pp) of the same ranks. ``ExpertRegion`` moves the tokens between the two::

    tokens [T, h] (replicated on tp)
      -- enter: keep own 1/tp slice (bwd all-gather), all-gather over etp (bwd reduce-scatter)
    tokens [T / tp * etp, h]       -> dispatch over ep -> experts (weights split over etp)
      -> combine: partial sums over etp
      -- exit: reduce-scatter over etp (bwd all-gather), all-gather over tp (bwd own slice)
    y [T, h] (replicated on tp)

The routing (``weights [T, k]``, ``experts [T, k]``) takes the same path as the tokens. Each tp
rank thus dispatches distinct tokens (no expert work is repeated), and every etp rank of an
expert sees all of that expert's tokens. When the etp group is the tp group (``etp == tp``
and the default order), split + gather is the identity and reduce-scatter + gather an
all-reduce: ``enter`` is Megatron's ``f`` (identity, backward all-reduce over tp) and ``exit``
its ``g`` (all-reduce over tp, backward identity). When ``T`` is not a multiple of tp (e.g. one
token per step in generation) ``enter`` appends zero tokens routed to the "dropped" expert id
``E`` (they reach no expert and are not counted) and ``exit`` removes them.
"""
from __future__ import annotations

from mindspore import nn, ops

from mcore.comm import (DifferentiableAllGather, DifferentiableReduceScatter, DifferentiableSplit,
                        all_gather, narrow)
from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.mappings import CopyToTPRegion, GatherSliceBackward, ReduceFromTPRegion

MoEGroups = ModelGroups


def check_supported(groups: ModelGroups) -> None:
    """``NotImplementedError`` naming the axis if ``groups`` splits what MoE cannot: ``cp``
    must be 1 (tp, ep and etp may take any size)."""
    if groups.cp.size > 1:
        raise NotImplementedError(f"MoELayer: cp size {groups.cp.size} > 1 is not supported")


def _maybe(cell_cls, group, *args):
    return cell_cls(group, *args) if group.size > 1 else None


class ExpertRegion(nn.Cell):
    """``enter(tokens [T, h], weights [T, k], experts [T, k])`` -> the same three with
    ``T' = ceil(T / tp) * etp`` rows (``T' = T`` when etp is the tp group);
    ``exit(y [T', h], T)`` -> ``[T, h]`` summed over etp and replicated on tp. See the module
    docstring. ``num_experts``: the id of a dropped pair."""

    def __init__(self, groups: ModelGroups, num_experts: int):
        super().__init__()
        tp, etp = groups.tp, groups.etp
        self.tp, self.etp, self.num_experts = tp, etp, num_experts
        self.same = tp.size > 1 and tp.ranks == etp.ranks
        self.gather_factor = 1 if self.same else etp.size  # token slices per dispatch source
        if self.same:
            self.copy_x, self.copy_w = CopyToTPRegion(tp), CopyToTPRegion(tp)
            self.reduce_y = ReduceFromTPRegion(tp)
            return
        self.split_x = _maybe(DifferentiableSplit, tp, 0)
        self.split_w = _maybe(DifferentiableSplit, tp, 0)
        self.gather_x = _maybe(DifferentiableAllGather, etp, 0)
        self.gather_w = _maybe(DifferentiableAllGather, etp, 0)
        self.scatter_y = _maybe(DifferentiableReduceScatter, etp, 0)
        self.gather_y = _maybe(GatherSliceBackward, tp, 0)

    def enter(self, tokens, weights, experts):
        if self.same:
            return self.copy_x(tokens), self.copy_w(weights), experts
        if self.split_x is not None:
            pad = -tokens.shape[0] % self.tp.size
            if pad:  # [T, .] -> [T + pad, .]: zero tokens, routed nowhere
                k = experts.shape[1]
                tokens = ops.cat([tokens, ops.zeros((pad, tokens.shape[1]), tokens.dtype)], 0)
                weights = ops.cat([weights, ops.zeros((pad, k), weights.dtype)], 0)
                experts = ops.cat([experts, ops.fill(experts.dtype, (pad, k), self.num_experts)],
                                  0)
            n = tokens.shape[0] // self.tp.size
            tokens, weights = self.split_x(tokens), self.split_w(weights)  # [T, .] -> [T/tp, .]
            experts = narrow(experts, 0, self.tp.rank * n, n)
        if self.gather_x is not None:
            tokens, weights = self.gather_x(tokens), self.gather_w(weights)  # -> [etp*T/tp, .]
            experts = all_gather(experts, self.etp, 0)
        return tokens, weights, experts

    def exit(self, y, num_tokens: int):
        if self.same:
            return self.reduce_y(y)
        if self.scatter_y is not None:
            y = self.scatter_y(y)  # [etp*T/tp, h] partial -> [T/tp, h] summed over etp
        if self.gather_y is not None:
            y = self.gather_y(y)  # [T/tp, h] -> [T (+ pad), h]
            if y.shape[0] != num_tokens:
                y = narrow(y, 0, 0, num_tokens)  # drop the padding: [T + pad, h] -> [T, h]
        return y
