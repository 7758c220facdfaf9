"""InternLM (v1: InternLM-7B / 20B; HF ``model_type`` "internlm", remote code): config
mapping, layer spec, weight names.

Architecture: the Llama layer and Llama's weight names (``model.layers.N.self_attn.q_proj``
...; RMSNorm ``rms_norm_eps``, half-split RoPE, SwiGLU MLP, untied ``lm_head``) with biases on
``q_proj / k_proj / v_proj / o_proj`` when ``bias`` (default true), multi-head attention.
RoPE base: ``rotary.base`` (the 20B configs' ``rotary = {"base", "type"}``), else
``rope_theta``, else 10000. ``rotary.type`` "dynamic" (dynamic NTK) only changes the
frequencies past ``max_position_embeddings``: it maps to plain RoPE, exact up to that length;
longer sequences run (no error) with unscaled frequencies, unlike the remote code.
Rejected: a ``rotary.type`` other than "origin" / "dynamic".
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, RotaryConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.common import activation_from_hf, decoder_table

MODEL_TYPES = ("internlm",)
TIE_DEFAULT = False


def config_from_hf(hf: dict) -> TransformerConfig:
    rotary = hf.get("rotary") or {}
    if rotary.get("type", "origin") not in ("origin", "dynamic"):
        raise ValueError(f"rotary.type={rotary['type']!r}: unsupported for internlm (supported: "
                         "origin, dynamic)")
    base = float(rotary.get("base", hf.get("rope_theta", 10000.0)))
    bias = bool(hf.get("bias", True))
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        activation=activation_from_hf(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rotary=RotaryConfig(base=base), attention=AttentionConfig(qkv_bias=bias, out_bias=bias))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    return decoder_table(cfg, tie, qkv_bias=cfg.attention.qkv_bias,
                         out_bias=cfg.attention.out_bias)
