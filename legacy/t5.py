"""T5, T5 v1.1, Flan-T5 (HF ``model_type`` "t5"): config mapping, model builder, weight names.

Architecture (``models.t5.T5Model``): shared token embedding; pre-norm encoder and decoder
stacks with RMSNorm (T5's ``T5LayerNorm``: no mean, no bias), unscaled attention scores
(``softmax_scale=1.0``), no biases anywhere, a bucketed relative position bias stored in layer 0
of each stack and shared by all its layers; decoder layers add cross-attention. MLP from
``feed_forward_proj``: "relu" (``wi``, ``wo``), "gated-gelu" (v1.1 / Flan: ``wi_0`` = gate,
``wi_1`` = up, tanh GELU), also "gelu" / "gelu_new" / "silu" and "gated-silu".
Head: tied to ``shared`` unless ``tie_word_embeddings`` is false (then ``lm_head``); a tied head
multiplies the decoder output by ``d_model ** -0.5`` unless ``scale_decoder_outputs`` (written
by transformers 5) is false. Ignored tensors: the ``embed_tokens`` copies of ``shared`` and
the unused cross-attention ``relative_attention_bias`` some checkpoints hold.
Rejected with the key's name: another ``feed_forward_proj``, ``is_decoder`` / ``is_encoder_decoder``
other than a full encoder-decoder, ``num_heads`` not dividing over tp (at build time).
"""
from __future__ import annotations

from mcore.transformer.config import AttentionConfig, TransformerConfig
from models.t5 import T5Config, T5Model
from models.weights import Piece, pieces

MODEL_TYPES = ("t5",)
TIE_DEFAULT = True
IGNORED_SUFFIXES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                    "EncDecAttention.relative_attention_bias.weight")
_FEED_FORWARD = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "silu": "silu",
                 "gated-gelu": "geglu", "gated-gelu_new": "geglu", "gated-silu": "swiglu"}


def config_from_hf(hf: dict) -> T5Config:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _FEED_FORWARD:
        raise ValueError(f"feed_forward_proj={proj!r}: unsupported for model_type 't5' "
                         f"(supported: {sorted(_FEED_FORWARD)})")
    if hf.get("is_decoder") or hf.get("is_encoder_decoder", True) is not True:
        raise ValueError("is_decoder / is_encoder_decoder: only the full encoder-decoder T5 "
                         "is supported (is_decoder=false, is_encoder_decoder=true)")
    layers = hf.get("num_layers", 6)
    cfg = TransformerConfig(
        num_layers=layers, hidden_size=hf.get("d_model", 512),
        num_attention_heads=hf.get("num_heads", 8), head_dim=hf.get("d_kv", 64),
        ffn_hidden_size=hf.get("d_ff", 2048), activation=_FEED_FORWARD[proj], norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), position_embedding="relative",
        attention=AttentionConfig(softmax_scale=1.0))
    tied = hf.get("tie_word_embeddings", TIE_DEFAULT) is not False
    return T5Config(
        transformer=cfg, num_decoder_layers=hf.get("num_decoder_layers") or layers,
        vocab_size=hf.get("vocab_size", 32128),
        num_buckets=hf.get("relative_attention_num_buckets", 32),
        max_distance=hf.get("relative_attention_max_distance", 128),
        scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", tied)),
        decoder_start_token_id=int(hf.get("decoder_start_token_id") or hf.get("pad_token_id")
                                   or 0))


def layer_spec(cfg: T5Config):
    """T5 has no decoder-only layer spec: ``build_model`` builds the whole model."""
    raise ValueError("model_type 't5' is an encoder-decoder: build it with build_model")


def build_model(hf: dict, cfg: T5Config, tie: bool, groups=None) -> T5Model:
    return T5Model(cfg, tie_embeddings=tie, groups=groups)


def _attention(hf: str, me: str, fused_qkv: bool, inner: int) -> dict:
    """q / k / v / o of one attention (``inner`` = heads x d_kv rows each)."""
    if fused_qkv:
        qkv = {f"{me}.linear_qkv.weight": tuple(Piece(f"{hf}.{x}.weight", inner) for x in "qkv")}
    else:
        qkv = {f"{me}.linear_q.weight": pieces(f"{hf}.q.weight"),
               f"{me}.linear_kv.weight": tuple(Piece(f"{hf}.{x}.weight", inner) for x in "kv")}
    return {**qkv, f"{me}.linear_proj.weight": pieces(f"{hf}.o.weight")}


def _mlp(hf: str, me: str, gated: bool, ffn: int) -> dict:
    fc1 = (tuple(Piece(f"{hf}.wi_{j}.weight", ffn) for j in range(2)) if gated
           else pieces(f"{hf}.wi.weight"))
    return {f"{me}.linear_fc1.weight": fc1, f"{me}.linear_fc2.weight": pieces(f"{hf}.wo.weight")}


def weight_table(cfg: T5Config, tie: bool) -> dict:
    tc = cfg.transformer
    gated, inner = tc.activation in ("geglu", "swiglu"), tc.num_attention_heads * tc.head_dim
    table = {"embedding.weight": pieces("shared.weight")}
    if not tie:
        table["output_layer.weight"] = pieces("lm_head.weight")
    for stack, depth in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        table[f"{stack}.final_norm.weight"] = pieces(f"{stack}.final_layer_norm.weight")
        table[f"{stack}.position_bias.weight"] = pieces(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        for i in range(depth):
            hf, me = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            mlp = 2 if stack == "decoder" else 1  # the decoder's layer.1 is cross-attention
            table.update(_attention(f"{hf}.0.SelfAttention", f"{me}.self_attention", True, inner))
            table.update(_mlp(f"{hf}.{mlp}.DenseReluDense", f"{me}.mlp", gated,
                              tc.ffn_hidden_size))
            table[f"{me}.input_norm.weight"] = pieces(f"{hf}.0.layer_norm.weight")
            table[f"{me}.pre_mlp_norm.weight"] = pieces(f"{hf}.{mlp}.layer_norm.weight")
            if stack == "decoder":
                table.update(_attention(f"{hf}.1.EncDecAttention", f"{me}.cross_attention",
                                        False, inner))
                table[f"{me}.pre_cross_attn_norm.weight"] = pieces(f"{hf}.1.layer_norm.weight")
    return table
