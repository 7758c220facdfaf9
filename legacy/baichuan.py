"""Baichuan / Baichuan2 (HF ``model_type`` "baichuan", remote code): config mapping, layer
spec, weight names.

Architecture: the Llama layer (RMSNorm ``rms_norm_eps``, multi-head attention without biases,
SwiGLU MLP ``gate_proj / up_proj / down_proj``, untied head) with two differences:

- q/k/v are one packed tensor ``self_attn.W_pack.weight [3h, h]`` = rows ``[q; k; v]``
  (split on load into our fused ``linear_qkv``).
- Positions: the 7B models use half-split RoPE (base 10000), the 13B models ALiBi (Bloom's
  slopes, ``mcore.transformer.positions``). The public configs do not name the scheme (each
  checkpoint ships its own modeling file); as serving stacks do, ``hidden_size == 4096`` means
  RoPE and any other width ALiBi. A ``position_embedding`` key ("rope" / "alibi") in
  config.json overrides that guess.
- Baichuan2's output head is a ``NormHead``: every vocabulary row of ``lm_head.weight`` is
  normalised to unit norm before the product (``TransformerConfig.norm_head``). Baichuan2 is
  told from Baichuan (plain head) by its vocabulary of 125696 tokens; a ``norm_head`` key
  (bool) in config.json overrides that.

Rejected: a ``position_embedding`` other than "rope" / "alibi".
"""
from __future__ import annotations

from mcore.transformer.config import RotaryConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from models.common import activation_from_hf, decoder_table
from models.weights import Piece

MODEL_TYPES = ("baichuan",)
TIE_DEFAULT = False
BAICHUAN2_VOCAB = 125696
ROPE_WIDTH = 4096  # the 7B models' hidden_size


def position_embedding(hf: dict) -> str:
    """"rope" or "alibi": the ``position_embedding`` key, else RoPE iff ``hidden_size == 4096``."""
    kind = hf.get("position_embedding", "rope" if hf["hidden_size"] == ROPE_WIDTH else "alibi")
    if kind not in ("rope", "alibi"):
        raise ValueError(f"position_embedding={kind!r}: must be 'rope' or 'alibi' for baichuan")
    return kind


def config_from_hf(hf: dict) -> TransformerConfig:
    norm_head = hf.get("norm_head", hf.get("vocab_size") == BAICHUAN2_VOCAB)
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        activation=activation_from_hf(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
        position_embedding=position_embedding(hf), norm_head=bool(norm_head),
        rotary=RotaryConfig(base=float(hf.get("rope_theta", 10000.0))))


def layer_spec(cfg: TransformerConfig):
    return gpt_layer_spec(cfg)


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    table = decoder_table(cfg, tie)
    h = cfg.hidden_size
    for i in range(cfg.num_layers):
        w_pack = f"model.layers.{i}.self_attn.W_pack.weight"  # [3h, h] = [q; k; v]
        table[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = tuple(
            Piece(w_pack, h, count=3, index=j) for j in range(3))
    return table
