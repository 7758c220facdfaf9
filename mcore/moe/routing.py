"""Routing math as plain functions (the ``TopKRouter`` Cell composes them).

Shapes: ``T`` tokens, ``E`` experts, ``k`` = top_k, ``G`` groups. Every function uses
``mindspore.ops`` forms (``mint`` top-k/sort have no CPU kernel), runs in PyNative and under
``mindspore.jit``, and is differentiable where a gradient makes sense (weights w.r.t. logits).

Routing result, used by the dispatchers: ``weights [T, k]`` (float) and ``experts [T, k]``
(int32). A dropped (token, expert) pair has weight 0 and expert id ``E`` (one past the last
expert), so permutation sorts it behind every kept pair and no expert computes it.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mcore.moe.config import MoEConfig


def scores_of(logits, score_function: str):
    """``softmax`` or ``sigmoid`` of fp32 logits ``[T, E]``."""
    if score_function == "softmax":
        return ops.softmax(logits, axis=-1)
    return ops.sigmoid(logits)


def group_mask(selection, num_groups: int, group_topk: int, group_score: str):
    """Boolean ``[T, E]``: True for the experts of each token's ``group_topk`` best groups.

    A group's score is its best expert's (``"max"``) or the sum of its best two
    (``"top2_sum"``) selection scores.
    """
    T, E = selection.shape
    grouped = selection.reshape(T, num_groups, E // num_groups)  # [T, G, E/G]
    if group_score == "max":
        gscore = grouped.max(axis=-1)  # [T, G]
    else:
        gscore = ops.topk(grouped, 2, dim=-1)[0].sum(-1)  # [T, G]
    best = ops.topk(gscore, group_topk, dim=-1)[1]  # [T, group_topk]
    chosen = ops.one_hot(best, num_groups, ms.Tensor(1.0, ms.float32),
                         ms.Tensor(0.0, ms.float32)).sum(1)  # [T, G]
    # [T, G] -> [T, G, E/G] -> [T, E]
    expanded = ops.broadcast_to(chosen.reshape(T, num_groups, 1), (T, num_groups, E // num_groups))
    return expanded.reshape(T, E) > 0.5


def topk_routing(logits, cfg: MoEConfig, bias=None):
    """Choose ``k`` experts per token and their weights: ``(weights [T, k], experts [T, k])``.

    Selection uses ``scores + bias`` (``logits + bias`` for softmax with ``pre_softmax=False``),
    restricted to the best groups when ``cfg.num_groups``; the weights never include the bias:
    softmax/sigmoid scores of the chosen experts (softmax over the chosen logits when
    ``pre_softmax=False``), then optional renormalisation and ``scaling_factor``.
    """
    topk_first = cfg.score_function == "softmax" and not cfg.pre_softmax
    scores = logits if topk_first else scores_of(logits, cfg.score_function)  # [T, E]
    selection = scores if bias is None else scores + bias
    if cfg.num_groups:
        keep = group_mask(selection, cfg.num_groups, cfg.group_topk, cfg.group_score)
        selection = ops.masked_fill(selection, ops.logical_not(keep), float("-inf"))
    experts = ops.topk(selection, cfg.top_k, dim=-1)[1]  # [T, k]
    chosen = ops.gather_elements(scores, 1, experts)  # [T, k]
    weights = ops.softmax(chosen, axis=-1) if topk_first else chosen
    if cfg.normalize_topk and not topk_first:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    if cfg.scaling_factor != 1.0:
        weights = weights * cfg.scaling_factor
    return weights, experts.astype(ms.int32)


def expert_one_hot(experts, num_experts: int):
    """``[T, k]`` expert ids (``num_experts`` = dropped) -> float ``[T, k, E]`` one-hot."""
    on, off = ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)
    return ops.one_hot(experts, num_experts + 1, on, off)[..., :num_experts]


def tokens_per_expert(experts, num_experts: int):
    """How many (kept) pairs each expert receives: float ``[E]``."""
    return expert_one_hot(experts, num_experts).sum((0, 1))


def apply_capacity(weights, experts, num_experts: int, capacity: int, drop_policy: str):
    """Drop pairs beyond ``capacity`` per expert: returns ``(weights, experts)`` where a dropped
    pair has weight 0 and expert id ``num_experts``.

    ``"position"`` keeps each expert's earliest tokens; ``"probs"`` keeps its ``capacity``
    highest-weight tokens. Kept weights are not renormalised.
    """
    T, k = experts.shape
    onehot = expert_one_hot(experts, num_experts)  # [T, k, E]
    routed = onehot.sum(1)  # [T, E], 0/1 (an expert appears at most once per token)
    if capacity >= T:
        return weights, experts
    if drop_policy == "position":
        rank = ops.cumsum(routed, 0) - routed  # [T, E]: routed tokens before this one
        keep_te = ops.logical_and(routed > 0.5, rank < capacity)
    else:
        w_te = (onehot * ops.expand_dims(ops.stop_gradient(weights), -1)).sum(1)  # [T, E]
        ranked = ops.masked_fill(w_te, routed < 0.5, float("-inf"))
        top = ops.topk(ranked.transpose(1, 0), capacity, dim=-1)[1]  # [E, C] token ids
        kept = ops.one_hot(top, T, ms.Tensor(1.0, ms.float32),
                           ms.Tensor(0.0, ms.float32)).sum(1)  # [E, T]
        keep_te = ops.logical_and(routed > 0.5, kept.transpose(1, 0) > 0.5)
    keep = (onehot * ops.expand_dims(keep_te.astype(ms.float32), 1)).sum(-1) > 0.5  # [T, k]
    dropped = ops.fill(ms.int32, experts.shape, num_experts)
    return (ops.where(keep, weights, ops.zeros_like(weights)), ops.where(keep, experts, dropped))


def aux_scores(logits, score_function: str):
    """Per-token expert probabilities for the balancing losses: softmax, or sigmoid
    normalised to sum 1 per token. ``[T, E]``."""
    if score_function == "softmax":
        return ops.softmax(logits, axis=-1)
    s = ops.sigmoid(logits)
    return s / (s.sum(-1, keepdims=True) + 1e-20)


def switch_load_balancing_loss(probs, counts, top_k: int):
    """Switch Transformer loss ``E * sum_i f_i * P_i`` over ``T`` tokens, where
    ``f_i = counts_i / (T * k)`` is the share of selections that went to expert i and
    ``P_i = mean_t probs[t, i]`` its mean router probability. 1.0 when perfectly balanced."""
    T, E = probs.shape
    return (probs.mean(0) * counts).sum() * (E / (T * top_k))


def seq_load_balancing_loss(probs, counts_per_seq, top_k: int, batch: int):
    """DeepSeek-V3 sequence-wise loss: the Switch loss computed inside each sequence and
    averaged over the ``batch`` sequences. ``probs [B*S, E]`` (sequence-major),
    ``counts_per_seq [B, E]``."""
    BS, E = probs.shape
    S = BS // batch
    p = probs.reshape(batch, S, E).mean(1)  # [B, E]
    return (p * counts_per_seq).sum() * (E / (S * top_k * batch))


def z_loss(logits):
    """Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``."""
    return ops.square(ops.logsumexp(logits, -1)).mean()
