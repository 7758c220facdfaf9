"""InternLM2 / InternLM2.5 (HF ``model_type`` "internlm2", remote code): config mapping,
layer spec, weight names.

Architecture: the Llama layer (RMSNorm ``rms_norm_eps``, GQA, half-split RoPE ``rope_theta``,
SwiGLU MLP, untied head) under other names: ``model.tok_embeddings``,
``model.layers.N.attention_norm / attention.wqkv / attention.wo / ffn_norm /
feed_forward.w1 (gate) / w3 (up) / w2 (down)``, ``model.norm``, ``output``. ``bias`` puts
biases on ``wqkv`` and ``wo``.
``wqkv [(n + 2 g) d, h]`` packs the heads by key/value group: its rows are
``[g, qg + 2, d]`` (``qg = n / g`` query heads, then the key head, then the value head of
each group), split on load into our ``[q; k; v]`` (``Piece(span=qg)`` keeps a group's query
heads together).
``rope_scaling``: ``linear`` scales positions; ``dynamic`` (dynamic NTK) only changes the
frequencies past ``max_position_embeddings``, so it maps to plain RoPE: exact up to that
length; longer sequences run (no error) with unscaled frequencies, unlike the remote code.
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, RotaryConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.common import activation_from_hf
from models.weights import Piece, pieces

MODEL_TYPES = ("internlm2",)
TIE_DEFAULT = False


def rotary_from_hf(hf: dict) -> RotaryConfig:
    base = float(hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind in ("default", "dynamic"):
        return RotaryConfig(base=base)
    if kind == "linear":
        return RotaryConfig(base=base, scaling="linear", factor=float(scaling["factor"]))
    raise ValueError(f"rope_scaling.type={kind!r}: unsupported for internlm2 (supported: "
                     "linear, dynamic)")


def config_from_hf(hf: dict) -> TransformerConfig:
    bias = bool(hf.get("bias", False))
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        num_query_groups=hf.get("num_key_value_heads"), activation=activation_from_hf(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rotary=rotary_from_hf(hf),
        attention=AttentionConfig(qkv_bias=bias, out_bias=bias))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    n, g, d, f = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, cfg.ffn_hidden_size
    qg = n // g
    table = {"embedding.weight": pieces("model.tok_embeddings.weight"),
             "decoder.final_norm.weight": pieces("model.norm.weight")}
    if not tie:
        table["output_layer.weight"] = pieces("output.weight")
    kinds = ("weight", "bias") if cfg.attention.qkv_bias else ("weight",)
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}", f"decoder.layers.{i}"
        for kind in kinds:
            wqkv = f"{hf}.attention.wqkv.{kind}"  # rows [g, qg + 2, d]
            table[f"{me}.self_attention.linear_qkv.{kind}"] = (
                Piece(wqkv, n * d, groups=g, count=qg + 2, index=0, span=qg),
                Piece(wqkv, g * d, groups=g, count=qg + 2, index=qg),
                Piece(wqkv, g * d, groups=g, count=qg + 2, index=qg + 1))
            table[f"{me}.self_attention.linear_proj.{kind}"] = pieces(f"{hf}.attention.wo.{kind}")
        table.update({
            f"{me}.input_norm.weight": pieces(f"{hf}.attention_norm.weight"),
            f"{me}.pre_mlp_norm.weight": pieces(f"{hf}.ffn_norm.weight"),
            f"{me}.mlp.linear_fc1.weight": (Piece(f"{hf}.feed_forward.w1.weight", f),
                                            Piece(f"{hf}.feed_forward.w3.weight", f)),
            f"{me}.mlp.linear_fc2.weight": pieces(f"{hf}.feed_forward.w2.weight"),
        })
    return table
