"""TeleChat2 (``model_type`` "telechat", remote-code checkpoints of Tele-AI): mapping only.

Config mapping from the public config.json: ``n_layer`` -> num_layers, ``n_head`` -> heads,
``num_key_value_heads`` (absent = MHA), ``hidden_size``, ``ffn_hidden_size``,
``layer_norm_epsilon`` (RMSNorm), ``vocab_size``, ``tie_word_embeddings`` (default false).
Architecture: pre-norm RMSNorm layers, half-split RoPE with base 10000, SwiGLU MLP; biases
only on the attention output (``self_attention.dense.bias``) and the MLP output
(``mlp.down_proj.bias``). Weight names live under ``transformer.``; keys and values are one
tensor ``self_attention.key_value`` whose rows alternate per kv head ``[k_0, v_0, k_1, v_1..]``.

Not covered: the long-context tricks of the remote code (dynamic NTK base past
``training_seqlen`` and log-n attention scaling), which are inactive within ``training_seqlen``.
There is no transformers implementation to compare against, so this family is tested by
round trip (save -> load) and tp parity, not logits parity.
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, RotaryConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.weights import Piece, pieces

MODEL_TYPES = ("telechat",)
TIE_DEFAULT = False


def config_from_hf(hf: dict) -> TransformerConfig:
    return TransformerConfig(
        num_layers=hf["n_layer"], hidden_size=hf["hidden_size"], num_attention_heads=hf["n_head"],
        ffn_hidden_size=hf["ffn_hidden_size"], num_query_groups=hf.get("num_key_value_heads"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp_fc2_bias=True,
        rotary=RotaryConfig(base=float(hf.get("rope_theta", 10000.0))),
        attention=AttentionConfig(out_bias=True))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    kv_rows, f = cfg.num_query_groups * cfg.head_dim, cfg.ffn_hidden_size
    table = {"embedding.weight": pieces("transformer.word_embeddings.weight"),
             "decoder.final_norm.weight": pieces("transformer.ln_f.weight")}
    if not tie:
        table["output_layer.weight"] = pieces("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"transformer.h.{i}", f"decoder.layers.{i}"
        att, kv = f"{hf}.self_attention", f"{hf}.self_attention.key_value.weight"
        table.update({
            f"{me}.input_norm.weight": pieces(f"{hf}.input_layernorm.weight"),
            f"{me}.self_attention.linear_qkv.weight": (
                Piece(f"{att}.query.weight", cfg.num_attention_heads * cfg.head_dim),
                Piece(kv, kv_rows, groups=cfg.num_query_groups, count=2, index=0),
                Piece(kv, kv_rows, groups=cfg.num_query_groups, count=2, index=1)),
            f"{me}.self_attention.linear_proj.weight": pieces(f"{att}.dense.weight"),
            f"{me}.self_attention.linear_proj.bias": pieces(f"{att}.dense.bias"),
            f"{me}.pre_mlp_norm.weight": pieces(f"{hf}.post_attention_layernorm.weight"),
            f"{me}.mlp.linear_fc1.weight": (Piece(f"{hf}.mlp.gate_proj.weight", f),
                                            Piece(f"{hf}.mlp.up_proj.weight", f)),
            f"{me}.mlp.linear_fc2.weight": pieces(f"{hf}.mlp.down_proj.weight"),
            f"{me}.mlp.linear_fc2.bias": pieces(f"{hf}.mlp.down_proj.bias"),
        })
    return table
