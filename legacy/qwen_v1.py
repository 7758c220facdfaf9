"""Qwen (v1: Qwen-1.8B / 7B / 14B / 72B; HF ``model_type`` "qwen", remote code): config
mapping, layer spec, weight names.

Architecture: pre-norm RMSNorm layers (``ln_1`` / ``ln_2``, ``layer_norm_epsilon``),
multi-head attention whose packed ``attn.c_attn`` (an ``nn.Linear`` ``[3 p, h]`` with bias,
``p = kv_channels * num_attention_heads``) holds rows ``[q; k; v]``, output ``attn.c_proj``,
half-split RoPE over the first ``kv_channels * rotary_pct`` dims of each head (base
``rotary_emb_base``), a SwiGLU MLP of width ``intermediate_size / 2`` computed as
``c_proj(w1(x) * silu(w2(x)))`` (``w2`` is the gate, ``w1`` the up projection), final
``ln_f``, untied ``lm_head``. ``no_bias`` (default true) drops the biases of every projection
but ``c_attn``. Names live under ``transformer.`` (``wte``, ``h.N``, ``ln_f``).
``use_dynamic_ntk`` and ``use_logn_attn`` only act past ``seq_length`` tokens: within it the
model is exact; longer sequences run (no error) without them, unlike the remote code.
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, RotaryConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.weights import Piece, pieces

MODEL_TYPES = ("qwen",)
TIE_DEFAULT = False
BASE_PREFIX = "transformer."


def config_from_hf(hf: dict) -> TransformerConfig:
    n = hf["num_attention_heads"]
    head_dim = hf.get("kv_channels", hf["hidden_size"] // n)
    if hf["intermediate_size"] % 2:
        raise ValueError(f"intermediate_size={hf['intermediate_size']}: must be even (the MLP "
                         "width is intermediate_size / 2)")
    bias = not hf.get("no_bias", True)
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=n, head_dim=head_dim, ffn_hidden_size=hf["intermediate_size"] // 2,
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), mlp_fc1_bias=bias, mlp_fc2_bias=bias,
        rotary=RotaryConfig(base=float(hf.get("rotary_emb_base", 10000.0)),
                            fraction=float(hf.get("rotary_pct", 1.0))),
        attention=AttentionConfig(qkv_bias=True, out_bias=bias))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    p, f = cfg.num_attention_heads * cfg.head_dim, cfg.ffn_hidden_size
    table = {"embedding.weight": pieces("transformer.wte.weight"),
             "decoder.final_norm.weight": pieces("transformer.ln_f.weight")}
    if not tie:
        table["output_layer.weight"] = pieces("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"transformer.h.{i}", f"decoder.layers.{i}"
        table[f"{me}.input_norm.weight"] = pieces(f"{hf}.ln_1.weight")
        table[f"{me}.pre_mlp_norm.weight"] = pieces(f"{hf}.ln_2.weight")
        for kind in ("weight", "bias"):  # c_attn = [q; k; v] rows
            table[f"{me}.self_attention.linear_qkv.{kind}"] = tuple(
                Piece(f"{hf}.attn.c_attn.{kind}", p, count=3, index=j) for j in range(3))
        kinds = ("weight", "bias") if cfg.attention.out_bias else ("weight",)
        for kind in kinds:
            table[f"{me}.self_attention.linear_proj.{kind}"] = pieces(f"{hf}.attn.c_proj.{kind}")
            table[f"{me}.mlp.linear_fc1.{kind}"] = (Piece(f"{hf}.mlp.w2.{kind}", f),  # gate
                                                   Piece(f"{hf}.mlp.w1.{kind}", f))  # up
            table[f"{me}.mlp.linear_fc2.{kind}"] = pieces(f"{hf}.mlp.c_proj.{kind}")
    return table
