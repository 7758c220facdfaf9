"""MoEConfig: how tokens are routed to experts, how the router is balanced, what is dropped.

The one MoE configuration: ``TransformerConfig.moe`` is a ``MoEConfig`` (default
``num_experts=0``: a dense model, nothing else is read). Which layers are MoE is decided here
too (``first_k_dense``, ``layer_freq`` or an explicit ``moe_layers``; ``is_moe_layer``).
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
    """Mixture-of-experts routing, expert sizes and which layers are MoE.

    num_experts: routed experts per MoE layer (E); 0 = a dense model (the default).
    first_k_dense: layers ``0 .. first_k_dense - 1`` keep the dense MLP (DeepSeek's
        ``first_k_dense_replace``).
    layer_freq: of the remaining layers, layer ``i`` is MoE when ``i % layer_freq == 0``
        (1 = all of them).
    moe_layers: explicit global indices of the MoE layers (then ``first_k_dense`` and
        ``layer_freq`` must keep their defaults); checked against ``num_layers`` by
        ``TransformerConfig``.
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

    num_experts: int = 0
    first_k_dense: int = 0
    layer_freq: int = 1
    moe_layers: tuple | None = None
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
        _require(isinstance(E, int) and E >= 0, "num_experts", E, "must be an int >= 0")
        _require(self.first_k_dense >= 0, "first_k_dense", self.first_k_dense, "must be >= 0")
        _require(self.layer_freq >= 1, "layer_freq", self.layer_freq, "must be >= 1")
        if self.moe_layers is not None:
            layers = tuple(self.moe_layers)
            _require(all(isinstance(i, int) and i >= 0 for i in layers)
                     and len(set(layers)) == len(layers), "moe_layers", self.moe_layers,
                     "must be distinct layer indices >= 0")
            _require(self.first_k_dense == 0 and self.layer_freq == 1, "moe_layers",
                     self.moe_layers, "set either moe_layers or first_k_dense / layer_freq")
            object.__setattr__(self, "moe_layers", tuple(sorted(layers)))
        if E == 0:
            return  # dense: the routing fields are not read
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

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether global layer ``layer_number`` (0-based) has a MoE mlp (never when dense)."""
        if self.num_experts == 0:
            return False
        if self.moe_layers is not None:
            return layer_number in self.moe_layers
        return layer_number >= self.first_k_dense and layer_number % self.layer_freq == 0

    def check_layers(self, num_layers: int) -> None:
        """``ValueError`` naming the field if the MoE layer choice does not fit ``num_layers``."""
        if self.moe_layers is not None and self.moe_layers:
            _require(self.moe_layers[-1] < num_layers, "moe_layers", self.moe_layers,
                     f"indices must be < num_layers={num_layers}")
        if self.num_experts:
            _require(any(self.is_moe_layer(i) for i in range(num_layers)), "first_k_dense",
                     self.first_k_dense, f"leaves no MoE layer among num_layers={num_layers} "
                     f"(layer_freq={self.layer_freq}, moe_layers={self.moe_layers})")

    def capacity(self, num_tokens: int) -> int | None:
        """Rows an expert may take from ``num_tokens`` local tokens (None = dropless)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(num_tokens * self.top_k / self.num_experts * self.capacity_factor))
