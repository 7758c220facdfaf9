"""MoEConfig: how tokens are routed to experts, how the router is balanced, what is dropped.

This is the routing-side configuration of ``mcore.moe``. ``TransformerConfig.moe``
(``mcore/transformer/config.py``) still holds the four size fields used by the dense model
path; joining the two is part of the layer-spec integration (see docs/moe.md).
Every bad value raises a one-line ``ValueError`` naming the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCORE_FUNCTIONS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
DROP_POLICIES = ("probs", "position")


def _require(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"moe.{name}={value!r}: {why}")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts routing and expert sizes.

    num_experts: routed experts per layer (E).
    top_k: experts chosen per token (k).
    ffn_hidden_size: hidden size of one routed expert.
    shared_ffn_hidden_size: hidden size of the shared expert that every token passes
        through (0 = no shared expert).
    shared_expert_gate: multiply the shared expert's output by ``sigmoid(x . w_gate)``
        (one learned gate vector of size hidden).
    score_function: "softmax" or "sigmoid", applied to the fp32 router logits.
    pre_softmax: softmax only: True = softmax over all E logits, then top-k of the
        probabilities; False = top-k of the logits, then softmax over the k chosen.
    normalize_topk: divide the k chosen weights by their sum (sigmoid routers, Qwen3-MoE).
    scaling_factor: multiply the final weights by this (DeepSeek's routed_scaling_factor).
    num_groups: group-limited routing: experts are split into this many equal groups and a
        token chooses among the experts of its best ``group_topk`` groups (0 = off).
    group_topk: groups kept per token when ``num_groups`` > 0.
    group_score: score of a group: "max" (its best expert) or "top2_sum" (its best two).
    expert_bias: a per-expert bias added to the scores for SELECTION only (aux-loss-free
        balancing); not trained by gradients, moved by ``router.update_expert_bias``.
    bias_update_rate: step of that update: ``bias += rate * sign(mean_load - load)``.
    aux_loss_coeff: coefficient of the Switch load-balancing loss (0 = not computed).
    seq_aux_loss_coeff: coefficient of the sequence-level balancing loss (DeepSeek-V3).
    z_loss_coeff: coefficient of the router z-loss ``mean(logsumexp(logits)^2)``.
    capacity_factor: None = dropless. Otherwise each expert takes at most
        ``ceil(tokens * top_k / num_experts * capacity_factor)`` of the local tokens.
    drop_policy: which tokens an over-full expert keeps: "probs" (highest weights) or
        "position" (earliest tokens).
    pad_to_capacity: with a capacity, every expert receives exactly ``capacity`` rows
        (zero rows fill the gap), so expert shapes are static.
    """

    num_experts: int
    top_k: int = 2
    ffn_hidden_size: int = 0
    shared_ffn_hidden_size: int = 0
    shared_expert_gate: bool = False
    score_function: str = "softmax"
    pre_softmax: bool = False
    normalize_topk: bool = False
    scaling_factor: float = 1.0
    num_groups: int = 0
    group_topk: int = 0
    group_score: str = "max"
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.0
    seq_aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False

    def __post_init__(self):
        E = self.num_experts
        _require(E > 0, "num_experts", E, "must be > 0")
        _require(0 < self.top_k <= E, "top_k", self.top_k, f"must be in [1, num_experts={E}]")
        _require(self.ffn_hidden_size >= 0, "ffn_hidden_size", self.ffn_hidden_size, "must be >= 0")
        _require(self.shared_ffn_hidden_size >= 0, "shared_ffn_hidden_size",
                 self.shared_ffn_hidden_size, "must be >= 0")
        _require(self.score_function in SCORE_FUNCTIONS, "score_function", self.score_function,
                 f"must be one of {SCORE_FUNCTIONS}")
        _require(self.scaling_factor > 0, "scaling_factor", self.scaling_factor, "must be > 0")
        _require(self.group_score in GROUP_SCORES, "group_score", self.group_score,
                 f"must be one of {GROUP_SCORES}")
        _require(self.num_groups >= 0, "num_groups", self.num_groups, "must be >= 0")
        if self.num_groups:
            G = self.num_groups
            _require(E % G == 0, "num_groups", G, f"must divide num_experts={E}")
            _require(0 < self.group_topk <= G, "group_topk", self.group_topk,
                     f"must be in [1, num_groups={G}]")
            _require(self.top_k <= self.group_topk * (E // G), "top_k", self.top_k,
                     f"exceeds the {self.group_topk * (E // G)} experts of group_topk groups")
            _require(self.group_score != "top2_sum" or E // G >= 2, "group_score",
                     self.group_score, f"needs >= 2 experts per group, have {E // G}")
        for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _require(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
                 self.capacity_factor, "must be > 0 or None (dropless)")
        _require(self.drop_policy in DROP_POLICIES, "drop_policy", self.drop_policy,
                 f"must be one of {DROP_POLICIES}")
        _require(not self.pad_to_capacity or self.capacity_factor is not None, "pad_to_capacity",
                 self.pad_to_capacity, "needs a capacity_factor")

    def capacity(self, num_tokens: int) -> int | None:
        """Rows an expert may take from ``num_tokens`` local tokens (None = dropless)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(num_tokens * self.top_k / self.num_experts * self.capacity_factor))
