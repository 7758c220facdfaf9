"""ChatGLM2 / ChatGLM3 / CodeGeeX2 / GLM-4 remote code (HF ``model_type`` "chatglm"): config
mapping, layer spec, weight names.

Architecture: pre-norm layers (RMSNorm with ``rmsnorm``, else LayerNorm with bias;
``layernorm_epsilon``), grouped-query attention with a fused
``self_attention.query_key_value`` whose rows are ``[q (n d); k (g d); v (g d)]``
(``g = multi_query_group_num`` key/value heads, ``d = kv_channels``); a bias on it with
``add_qkv_bias`` or ``add_bias_linear``, on the output ``dense`` and the MLP with
``add_bias_linear``. GLM rotary: interleaved pairs ``(2i, 2i + 1)`` over the first half of
each head (``RotaryConfig(fraction=0.5, interleaved=True)``), base ``10000 * rope_ratio``.
The MLP ``dense_h_to_4h`` packs ``[gate; up]`` (``2 ffn_hidden_size`` rows) for SwiGLU,
``dense_4h_to_h`` projects back. The final norm is ``encoder.final_layernorm``
(``post_layer_norm``), the head ``transformer.output_layer``, the embedding
``transformer.embedding.word_embeddings`` of ``padded_vocab_size`` rows (``vocab_size``). The
``rotary_pos_emb.inv_freq`` buffer some checkpoints hold is ignored.
Rejected: ChatGLM-6B v1 configs (``position_encoding_2d``), ``multi_query_attention=false``
(per-head interleaved rows; no released checkpoint uses it),
``apply_residual_connection_post_layernorm``, ``post_layer_norm=false``, prefix tuning
(``pre_seq_len``).
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, RotaryConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.weights import Piece, pieces

MODEL_TYPES = ("chatglm",)
TIE_DEFAULT = False
IGNORED_SUFFIXES = (".rotary_pos_emb.inv_freq",)


def vocab_size(hf: dict) -> int:
    return hf["padded_vocab_size"]


def config_from_hf(hf: dict) -> TransformerConfig:
    for key, bad in (("multi_query_attention", False),
                     ("apply_residual_connection_post_layernorm", True),
                     ("post_layer_norm", False)):
        if hf.get(key, not bad) == bad:
            raise ValueError(f"{key}={str(bad).lower()}: not supported for chatglm")
    if "position_encoding_2d" in hf:
        raise ValueError("position_encoding_2d: a ChatGLM-6B (v1) config; only ChatGLM2/3, "
                         "CodeGeeX2 and GLM-4 remote code are supported")
    if hf.get("pre_seq_len"):
        raise ValueError(f"pre_seq_len={hf['pre_seq_len']}: prefix tuning is not supported")
    n, h = hf["num_attention_heads"], hf["hidden_size"]
    bias = bool(hf.get("add_bias_linear", False))
    return TransformerConfig(
        num_layers=hf["num_layers"], hidden_size=h, num_attention_heads=n,
        num_query_groups=hf["multi_query_group_num"], head_dim=hf.get("kv_channels") or h // n,
        ffn_hidden_size=hf["ffn_hidden_size"],
        norm="rmsnorm" if hf.get("rmsnorm", True) else "layernorm",
        norm_eps=hf.get("layernorm_epsilon", 1e-5), mlp_fc1_bias=bias, mlp_fc2_bias=bias,
        rotary=RotaryConfig(base=10000.0 * float(hf.get("rope_ratio", 1.0)), fraction=0.5,
                            interleaved=True),
        attention=AttentionConfig(qkv_bias=bias or bool(hf.get("add_qkv_bias", False)),
                                  out_bias=bias))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    n, g, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    f = cfg.ffn_hidden_size
    norms = ("weight", "bias") if cfg.norm == "layernorm" else ("weight",)
    enc = "transformer.encoder"
    table = {"embedding.weight": pieces("transformer.embedding.word_embeddings.weight")}
    for kind in norms:
        table[f"decoder.final_norm.{kind}"] = pieces(f"{enc}.final_layernorm.{kind}")
    if not tie:
        table["output_layer.weight"] = pieces("transformer.output_layer.weight")
    for i in range(cfg.num_layers):
        hf, me = f"{enc}.layers.{i}", f"decoder.layers.{i}"
        for kind in norms:
            table[f"{me}.input_norm.{kind}"] = pieces(f"{hf}.input_layernorm.{kind}")
            table[f"{me}.pre_mlp_norm.{kind}"] = pieces(f"{hf}.post_attention_layernorm.{kind}")
        qkv_kinds = ("weight", "bias") if cfg.attention.qkv_bias else ("weight",)
        for kind in qkv_kinds:
            qkv = f"{hf}.self_attention.query_key_value.{kind}"  # [q; k; v] rows
            table[f"{me}.self_attention.linear_qkv.{kind}"] = (
                Piece(qkv, n * d, offset=0), Piece(qkv, g * d, offset=n * d),
                Piece(qkv, g * d, offset=(n + g) * d))
        for kind in ("weight", "bias") if cfg.attention.out_bias else ("weight",):
            h4 = f"{hf}.mlp.dense_h_to_4h.{kind}"  # [gate; up]
            table.update({
                f"{me}.self_attention.linear_proj.{kind}": pieces(
                    f"{hf}.self_attention.dense.{kind}"),
                f"{me}.mlp.linear_fc1.{kind}": (Piece(h4, f, count=2, index=0),
                                                Piece(h4, f, count=2, index=1)),
                f"{me}.mlp.linear_fc2.{kind}": pieces(f"{hf}.mlp.dense_4h_to_h.{kind}"),
            })
    return table
