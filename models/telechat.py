"""TeleChat and TeleChat2 (``model_type`` "telechat", remote-code checkpoints of Tele-AI):
mapping only.

Config mapping from the public config.json: ``n_layer`` -> num_layers, ``n_head`` -> heads,
``num_key_value_heads`` (absent = MHA), ``hidden_size``, ``ffn_hidden_size``,
``layer_norm_epsilon`` (RMSNorm), ``vocab_size``, ``tie_word_embeddings`` (absent: tied, as
transformers reads a config without it; TeleChat2's configs say false, TeleChat v1's 7B
checkpoint has no ``lm_head``). Architecture: pre-norm RMSNorm layers, half-split RoPE, SwiGLU
MLP; biases only on the attention output (``self_attention.dense.bias``) and the MLP output
(``mlp.down_proj.bias``). Weight names live under ``transformer.`` (a base-model checkpoint
without it, as TeleChat v1's, loads too: ``BASE_PREFIX``); keys and values are one tensor
``self_attention.key_value`` whose rows alternate per kv head ``[k_0, v_0, k_1, v_1..]``.

RoPE base (``rope_base``): the remote code raises ``rope_theta`` (default 10000) by an NTK
factor ``alpha ** (d / (d - 2))`` (``d`` the head width) computed at ``training_seqlen``:
``alpha = 2 ** ceil(log2(training_seqlen / base_seqlen) + 1) - 1`` (at least 1), with
``base_seqlen`` 4096 where the config has none (TeleChat v1's code). TeleChat2 (``base_seqlen``
= ``training_seqlen``) keeps 10000; TeleChat v1 (8192 / 4096) uses ``10000 * 3 ** (d / (d -
2))``. Rejected: ``embed_layernorm`` and ``apply_residual_connection_post_layernorm`` true.

Not covered: the long-context tricks of the remote code (a larger NTK factor past
``training_seqlen``, its ``mscale`` and log-n attention scaling), inactive within
``training_seqlen``; v1's training-mode rotary, which uses the batch length instead of
``training_seqlen``. There is no transformers implementation of the remote code; the fixture
is transformers' Llama with TeleChat's names (biases zeroed).
"""
from __future__ import annotations

import math

from mcore.transformer.config import AttentionConfig, RotaryConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.weights import Piece, pieces

MODEL_TYPES = ("telechat",)
TIE_DEFAULT = True
BASE_PREFIX = "transformer."
V1_BASE_SEQLEN = 4096  # TeleChat v1's remote code: a constant, not a config key


def rope_base(hf: dict) -> float:
    """The remote code's RoPE base within ``training_seqlen`` (see the module docstring)."""
    theta = float(hf.get("rope_theta", 10000.0))
    if not hf.get("training_seqlen"):
        return theta
    ratio = hf["training_seqlen"] / hf.get("base_seqlen", V1_BASE_SEQLEN)
    alpha = max(2 ** math.ceil(math.log2(ratio) + 1) - 1, 1)
    d = hf["hidden_size"] // hf["n_head"]
    return theta * alpha ** (d / (d - 2))


def config_from_hf(hf: dict) -> TransformerConfig:
    for key in ("embed_layernorm", "apply_residual_connection_post_layernorm"):
        if hf.get(key):
            raise ValueError(f"{key}=true: not supported for telechat")
    return TransformerConfig(
        num_layers=hf["n_layer"], hidden_size=hf["hidden_size"], num_attention_heads=hf["n_head"],
        ffn_hidden_size=hf["ffn_hidden_size"], num_query_groups=hf.get("num_key_value_heads"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp_fc2_bias=True,
        rotary=RotaryConfig(base=rope_base(hf)), attention=AttentionConfig(out_bias=True))


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
