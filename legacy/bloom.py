"""BLOOM (HF ``model_type`` "bloom"): config mapping, layer spec, weight names.

Architecture: no position embeddings but ALiBi attention biases (slopes split over tp with the
heads), a LayerNorm on the token embedding (``word_embeddings_layernorm``), pre-norm LayerNorm
layers, multi-head attention with biases, GELU (tanh approximation) MLP with biases, final
LayerNorm, head tied to the embedding. ``query_key_value`` stores q/k/v interleaved per head
(rows ``[q_0; k_0; v_0; q_1; ...]``), split on load into our ``[q; k; v]``.
Rejected: ``apply_residual_connection_post_layernorm`` (not implemented).
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.weights import Piece, pieces

MODEL_TYPES = ("bloom",)
TIE_DEFAULT = True
BASE_PREFIX = "transformer."


def config_from_hf(hf: dict) -> TransformerConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError("apply_residual_connection_post_layernorm=true: not supported for bloom")
    h = hf.get("hidden_size", hf.get("n_embed"))
    if h is None:
        raise KeyError("hidden_size")
    return TransformerConfig(
        num_layers=hf["n_layer"], hidden_size=h, num_attention_heads=hf["n_head"],
        ffn_hidden_size=4 * h, activation="gelu_tanh", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp_fc1_bias=True, mlp_fc2_bias=True,
        position_embedding="alibi", embedding_norm=True,
        attention=AttentionConfig(qkv_bias=True, out_bias=True))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    n, d = cfg.num_attention_heads, cfg.head_dim
    table = {"embedding.weight": pieces("transformer.word_embeddings.weight"),
             "embedding_norm.weight": pieces("transformer.word_embeddings_layernorm.weight"),
             "embedding_norm.bias": pieces("transformer.word_embeddings_layernorm.bias"),
             "decoder.final_norm.weight": pieces("transformer.ln_f.weight"),
             "decoder.final_norm.bias": pieces("transformer.ln_f.bias")}
    if not tie:
        table["output_layer.weight"] = pieces("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"transformer.h.{i}", f"decoder.layers.{i}"
        for kind in ("weight", "bias"):
            qkv = f"{hf}.self_attention.query_key_value.{kind}"
            table.update({
                f"{me}.input_norm.{kind}": pieces(f"{hf}.input_layernorm.{kind}"),
                f"{me}.self_attention.linear_qkv.{kind}": tuple(
                    Piece(qkv, n * d, groups=n, count=3, index=j) for j in range(3)),
                f"{me}.self_attention.linear_proj.{kind}": pieces(
                    f"{hf}.self_attention.dense.{kind}"),
                f"{me}.pre_mlp_norm.{kind}": pieces(f"{hf}.post_attention_layernorm.{kind}"),
                f"{me}.mlp.linear_fc1.{kind}": pieces(f"{hf}.mlp.dense_h_to_4h.{kind}"),
                f"{me}.mlp.linear_fc2.{kind}": pieces(f"{hf}.mlp.dense_4h_to_h.{kind}"),
            })
    return table
