"""Ready-made layer specs for GPT-style decoders (``ModuleSpec`` trees).

``gpt_layer_spec(config)`` builds the standard pre-norm layer: the config's norm, fused-QKV
self-attention with optional QK-norm (``config.attention.qk_norm``), the dispatching core
attention, the MLP, and sandwich norms when ``config.sandwich_norm``. Families that need more
change one node of the returned tree (see docs/transformer.md).
"""
from __future__ import annotations

from mcore.fusions.attention import CoreAttention
from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.transformer.attention import SelfAttention, SelfAttentionSubmodules
from mcore.transformer.config import TransformerConfig
from mcore.transformer.layer import TransformerLayer, TransformerLayerSubmodules
from mcore.transformer.mlp import MLP, MLPSubmodules
from mcore.transformer.norm import RMSNorm, norm_class
from mcore.transformer.spec import IdentityOp, ModuleSpec


def attention_spec(config: TransformerConfig) -> ModuleSpec:
    qk_norm = RMSNorm if config.attention.qk_norm else IdentityOp
    return ModuleSpec(SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear, core_attention=CoreAttention,
        linear_proj=RowParallelLinear, q_layernorm=qk_norm, k_layernorm=qk_norm))


def mlp_spec(config: TransformerConfig) -> ModuleSpec:
    return ModuleSpec(MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                    linear_fc2=RowParallelLinear))


def gpt_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The standard decoder layer for ``config`` (see the module docstring)."""
    if config.moe.num_experts:
        raise NotImplementedError(f"moe.num_experts={config.moe.num_experts}: no MoE layer spec "
                                  "yet (mcore.moe); use a dense config")
    norm = norm_class(config.norm)
    sandwich = norm if config.sandwich_norm else IdentityOp
    return ModuleSpec(TransformerLayer, submodules=TransformerLayerSubmodules(
        input_norm=norm, self_attention=attention_spec(config), pre_mlp_norm=norm,
        mlp=mlp_spec(config), post_attn_norm=sandwich, post_mlp_norm=sandwich))
