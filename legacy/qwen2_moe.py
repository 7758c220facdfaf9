"""Qwen2-MoE / Qwen1.5-MoE / Qwen2-57B-A14B (HF ``model_type`` "qwen2_moe"): config mapping,
layer spec, weight names.

Architecture: the Qwen2 layer (RMSNorm, GQA with biases on q/k/v (``qkv_bias``, default true),
none on the output, half-split RoPE) where layer ``i`` has a sparse mixture of SwiGLU experts
(``num_experts`` of ``moe_intermediate_size``) when ``i`` is not in ``mlp_only_layers`` and
``(i + 1) % decoder_sparse_step == 0`` (Qwen3-MoE's rule, ``models.qwen3_moe.sparse_layers``);
the other layers keep a dense MLP of ``intermediate_size``. Routing: softmax over all experts,
the ``num_experts_per_tok`` largest kept, renormalised only with ``norm_topk_prob``. Every MoE
layer adds a shared SwiGLU expert of ``shared_expert_intermediate_size`` scaled by
``sigmoid(x . w)`` (``shared_expert_gate``, a ``[1, h]`` Linear):
``MoEConfig(shared_ffn_hidden_size=..., shared_expert_gate=True)``.
Weights: ``mlp.gate`` router, ``mlp.experts.e.{gate,up,down}_proj`` expert ``e``,
``mlp.shared_expert.{gate,up,down}_proj``, ``mlp.shared_expert_gate`` (stored ``[1, h]``, our
``shared_gate`` is ``[h, 1]``: a transposed piece). Rejected: sliding-window attention.
"""
from __future__ import annotations

from mcore.moe.config import MoEConfig
from mcore.transformer.config import AttentionConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_specs
from models.common import (activation_from_hf, aux_loss_coeff_from_hf, moe_decoder_table,
                           rope_from_hf)
from models.qwen3_moe import sparse_layers
from models.weights import Piece, pieces

MODEL_TYPES = ("qwen2_moe",)
TIE_DEFAULT = False


def moe_from_hf(hf: dict) -> MoEConfig:
    """The ``MoEConfig`` of a Qwen2-MoE config (dense when it has no MoE layer)."""
    layers, experts = sparse_layers(hf), hf.get("num_experts", 60)
    if not layers or not experts:
        return MoEConfig()
    top_k = hf.get("num_experts_per_tok", 4)
    shared = hf.get("shared_expert_intermediate_size", 5632)
    return MoEConfig(num_experts=experts, moe_layers=layers, top_k=top_k,
                     ffn_hidden_size=hf.get("moe_intermediate_size", 1408),
                     shared_ffn_hidden_size=shared, shared_expert_gate=shared > 0,
                     score_function="softmax", pre_softmax=True,
                     normalize_topk=bool(hf.get("norm_topk_prob", False)),
                     aux_loss_coeff=aux_loss_coeff_from_hf(hf, top_k, len(layers)))


def config_from_hf(hf: dict) -> TransformerConfig:
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true: sliding-window attention is not supported")
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        num_query_groups=hf.get("num_key_value_heads"), activation=activation_from_hf(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rotary=rope_from_hf(hf), moe=moe_from_hf(hf),
        attention=AttentionConfig(qkv_bias=bool(hf.get("qkv_bias", True))))


def layer_spec(cfg: TransformerConfig):
    """One spec per layer: the standard layer, with a ``MoELayer`` mlp where ``cfg.moe`` says."""
    return gpt_layer_specs(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    table = moe_decoder_table(cfg, tie, qkv_bias=cfg.attention.qkv_bias)
    fs = cfg.moe.shared_ffn_hidden_size
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i) or not fs:
            continue
        me, hf = f"decoder.layers.{i}.mlp", f"model.layers.{i}.mlp"
        table[f"{me}.shared_experts.linear_fc1.weight"] = (
            Piece(f"{hf}.shared_expert.gate_proj.weight", fs),
            Piece(f"{hf}.shared_expert.up_proj.weight", fs))
        table[f"{me}.shared_experts.linear_fc2.weight"] = pieces(
            f"{hf}.shared_expert.down_proj.weight")
        table[f"{me}.shared_gate"] = (Piece(f"{hf}.shared_expert_gate.weight", transposed=True),)
    return table
