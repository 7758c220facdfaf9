"""GPT-2 (HF ``model_type`` "gpt2"): config mapping, layer spec, weight names.

Architecture: learned absolute position embeddings (``wpe``) added to the token embedding,
pre-norm LayerNorm (with bias) layers, multi-head attention with biases on the fused q/k/v
projection and on the output, a GELU MLP with biases (``gelu_new`` = tanh approximation),
final LayerNorm, head tied to the token embedding.
Checkpoints store every projection as ``Conv1D`` (weight ``[in, out]``): the weight table marks
those pieces ``transposed``; ``c_attn`` holds ``[q | k | v]`` along its output columns.
Rejected: ``scale_attn_by_inverse_layer_idx`` and ``add_cross_attention`` (not implemented).
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.weights import Piece, pieces

MODEL_TYPES = ("gpt2",)
TIE_DEFAULT = True
BASE_PREFIX = "transformer."
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older files
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "relu": "relu"}


def activation(hf: dict, default: str = "gelu_new") -> str:
    """Our activation for HF ``activation_function`` (GPT-2 names; ``gelu_new`` is tanh GELU)."""
    act = hf.get("activation_function", default)
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation_function={act!r}: unsupported (supported: "
                         f"{sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


def gpt2_style_config(hf: dict, default_activation: str = "gelu_new",
                      **extra) -> TransformerConfig:
    """The ``TransformerConfig`` of a GPT-2-style config (``n_embd``, ``n_layer``, ``n_head``,
    ``n_inner``, ``n_positions``, ``layer_norm_epsilon``, ``activation_function``, whose
    absence means ``default_activation``); ``extra``: more ``TransformerConfig`` fields."""
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            raise ValueError(f"{key}=true: not supported for model_type={hf.get('model_type')!r}")
    h = hf["n_embd"]
    scale = None if hf.get("scale_attn_weights", True) else 1.0
    return TransformerConfig(
        num_layers=hf["n_layer"], hidden_size=h, num_attention_heads=hf["n_head"],
        ffn_hidden_size=hf.get("n_inner") or 4 * h, activation=activation(hf, default_activation), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp_fc1_bias=True, mlp_fc2_bias=True,
        position_embedding="learned", max_position_embeddings=hf.get("n_positions", 1024),
        attention=AttentionConfig(qkv_bias=True, out_bias=True, softmax_scale=scale), **extra)


def config_from_hf(hf: dict) -> TransformerConfig:
    return gpt2_style_config(hf)


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def gpt2_style_table(cfg: TransformerConfig, tie: bool, attention: dict,
                     transposed: bool) -> dict:
    """Weight table of a GPT-2-style checkpoint (``transformer.h.N.{ln_1, attn, ln_2, mlp}``);
    ``attention(i)`` gives layer ``i``'s q/k/v entries (names under ``decoder.layers.i``);
    ``transposed``: projections stored as ``Conv1D`` ``[in, out]``."""
    table = {"embedding.weight": pieces("transformer.wte.weight"),
             "position_embedding.weight": pieces("transformer.wpe.weight"),
             "decoder.final_norm.weight": pieces("transformer.ln_f.weight"),
             "decoder.final_norm.bias": pieces("transformer.ln_f.bias")}
    if not tie:
        table["output_layer.weight"] = pieces("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"transformer.h.{i}", f"decoder.layers.{i}"
        for kind in ("weight", "bias"):
            matrix = transposed and kind == "weight"
            table.update({
                f"{me}.input_norm.{kind}": pieces(f"{hf}.ln_1.{kind}"),
                f"{me}.pre_mlp_norm.{kind}": pieces(f"{hf}.ln_2.{kind}"),
                f"{me}.self_attention.linear_proj.{kind}": (
                    Piece(f"{hf}.attn.c_proj.{kind}", transposed=matrix),),
                f"{me}.mlp.linear_fc1.{kind}": (Piece(f"{hf}.mlp.c_fc.{kind}", transposed=matrix),),
                f"{me}.mlp.linear_fc2.{kind}": (
                    Piece(f"{hf}.mlp.c_proj.{kind}", transposed=matrix),),
            })
        table.update(attention(i))
    return table


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    h = cfg.hidden_size

    def attention(i: int) -> dict:
        c_attn = f"transformer.h.{i}.attn.c_attn"
        return {f"decoder.layers.{i}.self_attention.linear_qkv.{kind}": tuple(
            Piece(f"{c_attn}.{kind}", h, count=3, index=j, transposed=kind == "weight")
            for j in range(3)) for kind in ("weight", "bias")}

    return gpt2_style_table(cfg, tie, attention, transposed=True)
