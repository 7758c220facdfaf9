"""GLM-4 (GLM-4-9B in its transformers form, ``model_type`` "glm") and GLM-4-0414 ("glm4").

Both: RMSNorm, GQA with a bias on q/k/v (``attention_bias``), RoPE on half of each head
(``partial_rotary_factor`` 0.5) in the interleaved layout (pairs ``(2i, 2i+1)``), SwiGLU MLP
stored as one fused ``gate_up_proj`` ([gate; up]). "glm4" adds sandwich norms:
``post_self_attn_layernorm`` on the attention output and ``post_mlp_layernorm`` on the MLP
output, before each residual add.
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.common import activation_from_hf, decoder_table, rope_from_hf

MODEL_TYPES = ("glm", "glm4")
TIE_DEFAULT = False


def config_from_hf(hf: dict) -> TransformerConfig:
    fraction = (hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                     hf.get("partial_rotary_factor", 0.5))
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        num_query_groups=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        activation=activation_from_hf(hf), norm_eps=hf.get("rms_norm_eps", 1.5625e-07),
        sandwich_norm=hf.get("model_type") == "glm4",
        rotary=rope_from_hf(hf, interleaved=True, fraction=fraction),
        attention=AttentionConfig(qkv_bias=bool(hf.get("attention_bias", True))))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    return decoder_table(cfg, tie, qkv_bias=cfg.attention.qkv_bias, fused_gate_up=True,
                         sandwich=cfg.sandwich_norm)
