"""Hugging Face routing keys (DeepSeek-V2 / V3 style) -> ``MoEConfig``.

``moe_config_from_hf(hf, **overrides)`` reads the routing part of a Hugging Face ``config.json``
dict and returns the ``MoEConfig`` that routes exactly like it; families (and YAML runs that
name ``topk_method``) use it instead of re-deriving the mapping. Keys and what they become:

==========================  ==================================================================
``n_routed_experts``        ``num_experts`` (E)
``num_experts_per_tok``     ``top_k`` (k)
``moe_intermediate_size``   ``ffn_hidden_size``; ``n_shared_experts`` times it is
                            ``shared_ffn_hidden_size`` (one ungated dense shared MLP)
``first_k_dense_replace``   ``first_k_dense``; ``moe_layer_freq`` -> ``layer_freq``
``scoring_func``            ``score_function``: "softmax" or "sigmoid"
``topk_method``             "greedy": top-k of all experts; "group_limited_greedy" (V2): keep
                            the ``topk_group`` of ``n_group`` groups with the best expert
                            score, then top-k inside them; "noaux_tc" (V3): the same with the
                            group score = sum of its best two selection scores, and the
                            correction bias (``e_score_correction_bias``, our
                            ``expert_bias``) added to the scores for selection only
``norm_topk_prob``          ``normalize_topk`` (only when k > 1)
``routed_scaling_factor``   ``scaling_factor``; with "noaux_tc" it always multiplies the
                            weights; with the V2 methods only when they are not renormalised
                            (DeepSeek-V2's gate: renormalise XOR scale)
``aux_loss_alpha``          ``seq_aux_loss_coeff`` when ``seq_aux`` else ``aux_loss_coeff``
                            (only with ``aux_losses=True``)
==========================  ==================================================================

Weights are the unbiased scores of the chosen experts (softmax over all experts, no
renormalisation unless asked). Every bad key raises one ``ValueError`` line naming the Hugging
Face key (``n_group=3: must divide n_routed_experts=8``).

Masked experts: the selection inside the kept groups ranks the experts of the other groups at
``-inf``; the Hugging Face code fills them with 0.0 instead. The two choose differently only when
fewer than ``top_k`` kept experts have a selection score above 0 (possible with a negative
correction bias; never with softmax or sigmoid scores and a zero bias).
"""
from __future__ import annotations

from mcore.moe.config import MoEConfig

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
GROUP_SCORE_OF = {"group_limited_greedy": "max", "noaux_tc": "top2_sum"}


def _check(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: {why}")


def _int(hf: dict, key: str, default=None, low: int = 0) -> int:
    value = hf.get(key, default)
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, key, value,
           f"must be an integer >= {low}")
    return value


def routing_from_hf(hf: dict, aux_losses: bool = False) -> dict:
    """``MoEConfig`` keyword arguments of the routing keys of ``hf`` (see the module docstring).
    ``hf`` must have ``n_routed_experts`` > 0."""
    E = _int(hf, "n_routed_experts", low=1)
    k = _int(hf, "num_experts_per_tok", low=1)
    _check(k <= E, "num_experts_per_tok", k, f"must be <= n_routed_experts={E}")
    method = hf.get("topk_method", "greedy")
    _check(method in TOPK_METHODS, "topk_method", method, f"must be one of {TOPK_METHODS}")
    scoring = hf.get("scoring_func", "softmax")
    _check(scoring in SCORING_FUNCS, "scoring_func", scoring, f"must be one of {SCORING_FUNCS}")
    scale = hf.get("routed_scaling_factor", 1.0)
    _check(isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0,
           "routed_scaling_factor", scale, "must be a number > 0")
    normalize = bool(hf.get("norm_topk_prob", False)) and k > 1
    out = dict(num_experts=E, top_k=k, score_function=scoring, pre_softmax=True,
               normalize_topk=normalize, scaling_factor=float(scale))
    if method != "noaux_tc" and normalize:
        out["scaling_factor"] = 1.0  # DeepSeek-V2: renormalised weights are not scaled
    if method != "greedy":
        groups = _int(hf, "n_group", low=1)
        _check(E % groups == 0, "n_group", groups, f"must divide n_routed_experts={E}")
        topk_group = _int(hf, "topk_group", low=1)
        _check(topk_group <= groups, "topk_group", topk_group, f"must be <= n_group={groups}")
        per_group = E // groups
        _check(k <= topk_group * per_group, "num_experts_per_tok", k,
               f"exceeds the {topk_group * per_group} experts of topk_group={topk_group} groups")
        _check(method != "noaux_tc" or per_group >= 2, "n_group", groups,
               f"topk_method=noaux_tc scores a group by its best two experts: needs >= 2 "
               f"experts per group, have {per_group}")
        out.update(num_groups=groups, group_topk=topk_group, group_score=GROUP_SCORE_OF[method])
    out["expert_bias"] = method == "noaux_tc"
    if "moe_intermediate_size" in hf:
        ffn = _int(hf, "moe_intermediate_size", low=1)
        out["ffn_hidden_size"] = ffn
        out["shared_ffn_hidden_size"] = ffn * _int(hf, "n_shared_experts", 0)
    out["first_k_dense"] = _int(hf, "first_k_dense_replace", 0)
    out["layer_freq"] = _int(hf, "moe_layer_freq", 1, low=1)
    if aux_losses:
        alpha = hf.get("aux_loss_alpha", 0.0)
        _check(isinstance(alpha, (int, float)) and alpha >= 0, "aux_loss_alpha", alpha,
               "must be a number >= 0")
        out["seq_aux_loss_coeff" if hf.get("seq_aux", False) else "aux_loss_coeff"] = float(alpha)
    return out


def moe_config_from_hf(hf: dict, aux_losses: bool = False, **overrides) -> MoEConfig:
    """The ``MoEConfig`` of ``hf``'s routing keys, with ``overrides`` (``MoEConfig`` fields,
    e.g. ``capacity_factor``) applied on top."""
    return MoEConfig(**{**routing_from_hf(hf, aux_losses), **overrides})
