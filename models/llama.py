"""Llama 3 / 3.1 (HF ``model_type`` "llama"): config mapping, layer spec, weight names.

Architecture: RMSNorm pre-norm layers, GQA with half-split RoPE (Llama-3.1 frequency scaling
via ``rope_scaling.rope_type = "llama3"``), SwiGLU MLP, optional ``attention_bias`` /
``mlp_bias``, untied head unless ``tie_word_embeddings``.
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.common import activation_from_hf, moe_decoder_table, rope_from_hf

MODEL_TYPES = ("llama",)
TIE_DEFAULT = False


def config_from_hf(hf: dict) -> TransformerConfig:
    bias = bool(hf.get("attention_bias", False))
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true: MLP biases are not supported for llama yet")
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        num_query_groups=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        activation=activation_from_hf(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rotary=rope_from_hf(hf),
        attention=AttentionConfig(qkv_bias=bias, out_bias=bias))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    """The decoder's names; a training config with ``model.moe`` (family llama) has MoE layers,
    whose MLP entries are HF-style per-expert ``mlp.experts.e.*_proj`` stacks (for
    ``training/generate.py``'s checkpoint merge)."""
    return moe_decoder_table(cfg, tie, qkv_bias=cfg.attention.qkv_bias,
                             out_bias=cfg.attention.out_bias)
