"""Qwen2 / Qwen2.5 ("qwen2") and Qwen3 ("qwen3"): config mapping, layer spec, weight names.

Qwen2.5: Llama layout plus a bias on the q/k/v projections (none on o_proj); small models tie
the head to the embedding. Qwen3: no q/k/v bias (``attention_bias`` switches q/k/v/o bias),
an explicit ``head_dim``, and QK-norm (RMSNorm over ``head_dim`` on queries and keys before
RoPE). Both: SwiGLU MLP, RMSNorm, half-split RoPE (YaRN via ``rope_scaling``).
Sliding-window attention (``use_sliding_window``) is not supported and is rejected.
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.common import activation_from_hf, decoder_table, rope_from_hf

MODEL_TYPES = ("qwen2", "qwen3")
TIE_DEFAULT = False


def config_from_hf(hf: dict) -> TransformerConfig:
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true: sliding-window attention is not supported")
    qwen3 = hf.get("model_type") == "qwen3"
    bias = bool(hf.get("attention_bias", False))
    attention = (AttentionConfig(qkv_bias=bias, out_bias=bias, qk_norm=True) if qwen3
                 else AttentionConfig(qkv_bias=True))
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        num_query_groups=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        activation=activation_from_hf(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rotary=rope_from_hf(hf), attention=attention)


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    return decoder_table(cfg, tie, qkv_bias=cfg.attention.qkv_bias, out_bias=cfg.attention.out_bias,
                         qk_norm=cfg.attention.qk_norm)
