"""DeepSeek-V2 (HF ``model_type`` "deepseek_v2"; V2, V2-Lite, V2.5): the DeepSeek-V3 layer
layout and weight names (``models.deepseek_v3``) with DeepSeek-V2 routing and no correction
bias.

Routing (``mcore.moe.hf_routing``): softmax scores; ``topk_method`` "greedy" (default, V2-Lite)
or "group_limited_greedy" (V2: keep the ``topk_group`` groups with the best expert, then top-k
inside them); the weights are scaled by ``routed_scaling_factor`` unless ``norm_topk_prob``
renormalises them (DeepSeek's own V2 code; transformers 5's ``DeepseekV2TopkRouter`` ignores
``norm_topk_prob`` and always scales, so the two agree only with ``norm_topk_prob=false``, the
value of every released V2 config). ``q_lora_rank`` null (V2-Lite) is a direct ``q_proj``.
Rotary: V2 rotates interleaved pairs (its complex-number rotary) with YaRN and mscale.
V2 checkpoints have no MTP layers; the router's ``expert_bias`` is not stored.
"""
from __future__ import annotations

from mcore.transformer.config import TransformerConfig
from models import deepseek_v3

MODEL_TYPES = ("deepseek_v2",)
TIE_DEFAULT = False
ROUTING_DEFAULTS = {"topk_method": "greedy", "scoring_func": "softmax"}


def config_from_hf(hf: dict) -> TransformerConfig:
    if hf.get("use_mtp"):
        raise ValueError("use_mtp=True: DeepSeek-V2 checkpoints have no MTP layers")
    return deepseek_v3.config_from_hf(hf, routing_defaults=ROUTING_DEFAULTS,
                                      interleaved_default=True)


def layer_spec(cfg: TransformerConfig):
    return deepseek_v3.layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    return deepseek_v3.deepseek_table(cfg, tie, correction_bias=False)
