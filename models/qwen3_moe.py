"""Qwen3-MoE (HF ``model_type`` "qwen3_moe"): config mapping, layer spec, weight names.

Architecture: the Qwen3 layer (RMSNorm, GQA with QK-norm, explicit ``head_dim``, half-split
RoPE, optional ``attention_bias``) where layer ``i`` has a sparse mixture of SwiGLU experts
(``num_experts`` of ``moe_intermediate_size``) when ``i`` is not in ``mlp_only_layers`` and
``(i + 1) % decoder_sparse_step == 0``; the other layers keep a dense MLP of
``intermediate_size``. The router takes a softmax over all experts, keeps the
``num_experts_per_tok`` largest probabilities and renormalises them only with
``norm_topk_prob``: ``MoEConfig(pre_softmax=True, normalize_topk=norm_topk_prob)``. Weights:
``mlp.gate`` is the router, ``mlp.experts.e.gate_proj / up_proj / down_proj`` expert ``e``.
The expert count is ``num_experts`` (transformers >= 5 writes it as ``num_local_experts``).
The load-balancing loss follows ``output_router_logits`` / ``router_aux_loss_coef``
(``models.common.aux_loss_coeff_from_hf``). Sliding-window attention is rejected.
"""
from __future__ import annotations

from mcore.moe.config import MoEConfig
from mcore.transformer.config import AttentionConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_specs
from models.common import (activation_from_hf, aux_loss_coeff_from_hf, moe_decoder_table,
                           rope_from_hf)

MODEL_TYPES = ("qwen3_moe",)
TIE_DEFAULT = False


def sparse_layers(hf: dict) -> tuple[int, ...]:
    """Indices of the MoE layers: not in ``mlp_only_layers``, ``(i + 1) % decoder_sparse_step
    == 0``."""
    step = hf.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"decoder_sparse_step={step!r}: must be an integer >= 1")
    dense = set(hf.get("mlp_only_layers") or ())
    return tuple(i for i in range(hf["num_hidden_layers"])
                 if i not in dense and (i + 1) % step == 0)


def num_experts_of(hf: dict) -> int:
    if "num_experts" in hf:
        return hf["num_experts"]
    return hf["num_local_experts"]


def moe_from_hf(hf: dict) -> MoEConfig:
    """The ``MoEConfig`` of a Qwen3-MoE config (dense when it has no MoE layer)."""
    layers = sparse_layers(hf)
    experts = num_experts_of(hf)
    if not layers or not experts:
        return MoEConfig()
    top_k = hf.get("num_experts_per_tok", 8)
    return MoEConfig(num_experts=experts, moe_layers=layers, top_k=top_k,
                     ffn_hidden_size=hf["moe_intermediate_size"], score_function="softmax",
                     pre_softmax=True, normalize_topk=bool(hf.get("norm_topk_prob", False)),
                     aux_loss_coeff=aux_loss_coeff_from_hf(hf, top_k, len(layers)))


def config_from_hf(hf: dict) -> TransformerConfig:
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true: sliding-window attention is not supported")
    bias = bool(hf.get("attention_bias", False))
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        num_query_groups=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        activation=activation_from_hf(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rotary=rope_from_hf(hf), moe=moe_from_hf(hf),
        attention=AttentionConfig(qkv_bias=bias, out_bias=bias, qk_norm=True))


def layer_spec(cfg: TransformerConfig):
    """One spec per layer: the standard layer, with a ``MoELayer`` mlp where ``cfg.moe`` says."""
    return gpt_layer_specs(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    return moe_decoder_table(cfg, tie, qkv_bias=cfg.attention.qkv_bias,
                             out_bias=cfg.attention.out_bias, qk_norm=True)
