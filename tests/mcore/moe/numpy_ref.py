"""Plain-numpy references for MoE routing, losses, capacity and expert MLPs (float64, loops
where that is clearest). Imported by the MoE tests; no MindSpore here."""
from __future__ import annotations

import math

import numpy as np


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def route(logits, cfg, bias=None):
    """(weights [T, k], experts [T, k]) by the rules in MoEConfig's docstring."""
    T, E = logits.shape
    topk_first = cfg.score_function == "softmax" and not cfg.pre_softmax
    if topk_first:
        scores = logits
    elif cfg.score_function == "softmax":
        scores = softmax(logits)
    else:
        scores = sigmoid(logits)
    sel = scores + (0.0 if bias is None else bias)
    experts = np.zeros((T, cfg.top_k), np.int64)
    for t in range(T):
        row = sel[t].copy()
        if cfg.num_groups:
            per = E // cfg.num_groups
            gscore = []
            for g in range(cfg.num_groups):
                members = np.sort(row[g * per:(g + 1) * per])[::-1]
                gscore.append(members[0] if cfg.group_score == "max" else members[:2].sum())
            best = np.argsort(-np.array(gscore), kind="stable")[:cfg.group_topk]
            for g in range(cfg.num_groups):
                if g not in best:
                    row[g * per:(g + 1) * per] = -np.inf
        experts[t] = np.argsort(-row, kind="stable")[:cfg.top_k]
    chosen = np.take_along_axis(scores, experts, 1)
    weights = softmax(chosen) if topk_first else chosen
    if cfg.normalize_topk and not topk_first:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * cfg.scaling_factor, experts


def aux_probs(logits, score_function):
    if score_function == "softmax":
        return softmax(logits)
    s = sigmoid(logits)
    return s / s.sum(-1, keepdims=True)


def switch_loss(probs, experts, E, k):
    T = probs.shape[0]
    f = np.bincount(experts.reshape(-1), minlength=E)[:E] / (T * k)
    return E * float((f * probs.mean(0)).sum())


def seq_loss(probs, experts, E, k, batch):
    S = probs.shape[0] // batch
    return float(np.mean([switch_loss(probs[b * S:(b + 1) * S], experts[b * S:(b + 1) * S], E, k)
                          for b in range(batch)]))


def z_loss(logits):
    m = logits.max(-1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
    return float((lse ** 2).mean())


def capacity_drop(weights, experts, E, capacity, policy):
    """Loop reference of apply_capacity: dropped pairs get weight 0 and expert E."""
    weights, experts = weights.copy(), experts.copy()
    T, k = experts.shape
    for e in range(E):
        pairs = [(t, j) for t in range(T) for j in range(k) if experts[t, j] == e]
        if policy == "probs":
            pairs = sorted(pairs, key=lambda p: -weights[p])
        for p in pairs[capacity:]:
            weights[p], experts[p] = 0.0, E
    return weights, experts


def expert_mlp(x, w1, w2, activation):
    """One expert: x [n, h], w1 [h, 2f] ([gate | up]) or [h, f], w2 [f, h]."""
    y = x @ w1
    if activation == "swiglu":
        f = w2.shape[0]
        gate, up = y[:, :f], y[:, f:]
        y = gate * sigmoid(gate) * up
    else:
        y = 0.5 * y * (1.0 + np.vectorize(math.erf)(y / math.sqrt(2.0)))
    return y @ w2
