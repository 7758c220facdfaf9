"""Mixtral (HF ``model_type`` "mixtral"): config mapping, layer spec, weight names.

Architecture: the Llama layer (RMSNorm, GQA, half-split RoPE) with every MLP replaced by a
sparse mixture of SwiGLU experts (``num_local_experts``, ``intermediate_size`` each). The
router takes the ``num_experts_per_tok`` largest logits and weighs the chosen experts by a
softmax over those logits (the same as softmax over all, then renormalising the top-k):
``MoEConfig(pre_softmax=False)``. Weights: ``block_sparse_moe.gate`` is the router,
``block_sparse_moe.experts.e.w1 / w3 / w2`` are expert ``e``'s gate / up / down projections.
The load-balancing loss follows ``output_router_logits`` / ``router_aux_loss_coef``
(``models.common.aux_loss_coeff_from_hf``). Rejected: ``sliding_window`` (no sliding-window
attention) and ``router_jitter_noise`` > 0 (no jitter).
"""
from __future__ import annotations

from mcore.moe.config import MoEConfig
from mcore.transformer.config import TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_specs
from models.common import (activation_from_hf, aux_loss_coeff_from_hf, moe_decoder_table,
                           rope_from_hf)

MODEL_TYPES = ("mixtral",)
TIE_DEFAULT = False
EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


def moe_from_hf(hf: dict) -> MoEConfig:
    """The ``MoEConfig`` of a Mixtral config (every layer is MoE)."""
    if hf.get("router_jitter_noise"):
        raise ValueError(f"router_jitter_noise={hf['router_jitter_noise']!r}: router jitter "
                         "is not supported (use 0)")
    top_k = hf.get("num_experts_per_tok", 2)
    return MoEConfig(num_experts=hf["num_local_experts"], top_k=top_k,
                     ffn_hidden_size=hf["intermediate_size"], score_function="softmax",
                     pre_softmax=False,
                     aux_loss_coeff=aux_loss_coeff_from_hf(hf, top_k, hf["num_hidden_layers"]))


def config_from_hf(hf: dict) -> TransformerConfig:
    if hf.get("sliding_window"):
        raise ValueError(f"sliding_window={hf['sliding_window']!r}: sliding-window attention "
                         "is not supported")
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        num_query_groups=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        activation=activation_from_hf(hf), norm_eps=hf.get("rms_norm_eps", 1e-5),
        rotary=rope_from_hf(hf), moe=moe_from_hf(hf))


def layer_spec(cfg: TransformerConfig):
    """One spec per layer: the standard layer, with a ``MoELayer`` mlp where ``cfg.moe`` says."""
    return gpt_layer_specs(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    return moe_decoder_table(cfg, tie, moe_module="block_sparse_moe", expert_names=EXPERT_NAMES)
