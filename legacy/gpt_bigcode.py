"""StarCoder / WizardCoder / SantaCoder (HF ``model_type`` "gpt_bigcode"): config, spec, weights.

Architecture: GPT-2's (learned positions, LayerNorm with bias, biased projections, GELU MLP
with ``gelu_pytorch_tanh``, tied head), with ``multi_query`` (default true): one key/value head
shared by all query heads (``mcore.transformer.multi_query``: queries split over tp, the kv
head replicated). Projections are ``nn.Linear`` (``[out, in]``, not transposed).
``c_attn`` rows: multi-query ``[q (n d); k (d); v (d)]`` (``linear_q`` / ``linear_kv`` take
row ranges of it); otherwise per head ``[q_i; k_i; v_i]`` (the fused ``linear_qkv``).
"""
from __future__ import annotations

import dataclasses

from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.fusions.attention import CoreAttention
from mcore.transformer.config import TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec
from mcore.transformer.multi_query import (MultiQueryAttention, MultiQueryAttentionSubmodules,
                                           ReplicatedLinear)
from mcore.transformer.spec import ModuleSpec
from models.weights import Piece
from legacy.gpt2 import gpt2_style_config, gpt2_style_table

MODEL_TYPES = ("gpt_bigcode",)
TIE_DEFAULT = True
BASE_PREFIX = "transformer."


def config_from_hf(hf: dict) -> TransformerConfig:
    return gpt2_style_config(hf, "gelu_pytorch_tanh",
                             num_query_groups=1 if hf.get("multi_query", True) else None)


def layer_spec(cfg: TransformerConfig):
    spec = gpt_layer_spec(cfg)
    if cfg.num_query_groups != 1:
        return spec
    attention = ModuleSpec(MultiQueryAttention, submodules=MultiQueryAttentionSubmodules(
        linear_q=ColumnParallelLinear, linear_kv=ReplicatedLinear,
        core_attention=CoreAttention, linear_proj=RowParallelLinear))
    return spec.replace(submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    n, d = cfg.num_attention_heads, cfg.head_dim

    def attention(i: int) -> dict:
        c_attn, me = f"transformer.h.{i}.attn.c_attn", f"decoder.layers.{i}.self_attention"
        out = {}
        for kind in ("weight", "bias"):
            name = f"{c_attn}.{kind}"
            if cfg.num_query_groups == 1:
                out[f"{me}.linear_q.{kind}"] = (Piece(name, n * d, offset=0),)
                out[f"{me}.linear_kv.{kind}"] = (Piece(name, 2 * d, offset=n * d),)
            else:
                out[f"{me}.linear_qkv.{kind}"] = tuple(Piece(name, n * d, groups=n, count=3,
                                                             index=j) for j in range(3))
        return out

    return gpt2_style_table(cfg, tie, attention, transposed=False)
