"""Shared pieces of the family files: HF config fields -> mcore configs, and the weight table of
a Llama-style checkpoint (``model.layers.N.self_attn.q_proj`` ...), which most families reuse
with a few switches.
"""
from __future__ import annotations

from mcore.transformer.config import RotaryConfig, TransformerConfig
from models.weights import Piece, pieces

_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


def rope_from_hf(hf: dict, interleaved: bool = False, fraction: float | None = None) -> RotaryConfig:
    """``RotaryConfig`` from a HF config: ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (older files); ``partial_rotary_factor`` at either level."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={kind!r}: unsupported (supported: "
                         f"{sorted(_ROPE_TYPES)})")
    base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if fraction is None:
        fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    original = params.get("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings",
                                 hf.get("max_position_embeddings", 8192)))
    optional = {k: params[k] for k in ("low_freq_factor", "high_freq_factor", "beta_fast",
                                       "beta_slow", "mscale", "mscale_all_dim",
                                       "attention_factor", "truncate") if params.get(k) is not None}
    return RotaryConfig(base=float(base), fraction=float(fraction), interleaved=interleaved,
                        scaling=_ROPE_TYPES[kind], factor=float(params.get("factor") or 1.0),
                        original_max_position=int(original), **optional)


def activation_from_hf(hf: dict, key: str = "hidden_act") -> str:
    act = hf.get(key, "silu")
    table = {"silu": "swiglu", "swish": "swiglu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "relu": "relu"}
    if act not in table:
        raise ValueError(f"{key}={act!r}: unsupported activation (supported: {sorted(table)})")
    return table[act]


def decoder_table(cfg: TransformerConfig, tie: bool, prefix: str = "model", qkv_bias: bool = False,
                  out_bias: bool = False, qk_norm: bool = False, fused_gate_up: bool = False,
                  sandwich: bool = False) -> dict:
    """Weight table of a Llama-style HF checkpoint (names under ``prefix``); see models/weights.py."""
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_query_groups * cfg.head_dim
    f = cfg.ffn_hidden_size
    table = {"embedding.weight": pieces(f"{prefix}.embed_tokens.weight"),
             "decoder.final_norm.weight": pieces(f"{prefix}.norm.weight")}
    if not tie:
        table["output_layer.weight"] = pieces("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"{prefix}.layers.{i}", f"decoder.layers.{i}"
        att = f"{hf}.self_attn"
        table[f"{me}.input_norm.weight"] = pieces(f"{hf}.input_layernorm.weight")
        table[f"{me}.pre_mlp_norm.weight"] = pieces(f"{hf}.post_attention_layernorm.weight")
        for kind in ("weight",) + (("bias",) if qkv_bias else ()):
            table[f"{me}.self_attention.linear_qkv.{kind}"] = (
                Piece(f"{att}.q_proj.{kind}", q_rows), Piece(f"{att}.k_proj.{kind}", kv_rows),
                Piece(f"{att}.v_proj.{kind}", kv_rows))
        table[f"{me}.self_attention.linear_proj.weight"] = pieces(f"{att}.o_proj.weight")
        if out_bias:
            table[f"{me}.self_attention.linear_proj.bias"] = pieces(f"{att}.o_proj.bias")
        if qk_norm:
            table[f"{me}.self_attention.q_layernorm.weight"] = pieces(f"{att}.q_norm.weight")
            table[f"{me}.self_attention.k_layernorm.weight"] = pieces(f"{att}.k_norm.weight")
        if fused_gate_up:
            gate_up = f"{hf}.mlp.gate_up_proj.weight"
            table[f"{me}.mlp.linear_fc1.weight"] = (Piece(gate_up, f, count=2, index=0),
                                                    Piece(gate_up, f, count=2, index=1))
        else:
            table[f"{me}.mlp.linear_fc1.weight"] = (Piece(f"{hf}.mlp.gate_proj.weight", f),
                                                    Piece(f"{hf}.mlp.up_proj.weight", f))
        table[f"{me}.mlp.linear_fc2.weight"] = pieces(f"{hf}.mlp.down_proj.weight")
        if sandwich:
            table[f"{me}.post_attn_norm.weight"] = pieces(f"{hf}.post_self_attn_layernorm.weight")
            table[f"{me}.post_mlp_norm.weight"] = pieces(f"{hf}.post_mlp_layernorm.weight")
    return table
