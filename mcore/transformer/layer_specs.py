"""Ready-made layer specs for GPT-style decoders (``ModuleSpec`` trees).

``gpt_layer_spec(config)`` builds the standard pre-norm DENSE layer: the config's norm, fused-QKV
self-attention with optional QK-norm (``config.attention.qk_norm``) or, with
``config.multi_latent_attention``, multi-latent attention (``mla_attention_spec``), the
dispatching core attention, the MLP, and sandwich norms when ``config.sandwich_norm``.
Families that need more change one node of the returned tree (see docs/transformer.md).

Mixture of experts: ``moe_layer_specs(config, layer_spec)`` turns any dense layer spec into one
spec per layer whose mlp node is ``moe_mlp_spec(...)`` (a ``mcore.moe.MoELayer``) for the layers
``config.moe`` marks (``config.is_moe_layer(i)``) and unchanged for the others;
``gpt_layer_specs(config)`` is that for the standard layer (dense configs give N equal specs).
``TransformerBlock`` accepts the list and checks it against ``config.moe``.
"""
from __future__ import annotations

import dataclasses

from mcore.fusions.attention import CoreAttention
from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.transformer.attention import SelfAttention, SelfAttentionSubmodules
from mcore.transformer.config import TransformerConfig
from mcore.transformer.mla import MultiLatentAttention, mla_submodules
from mcore.transformer.layer import TransformerLayer, TransformerLayerSubmodules
from mcore.transformer.mlp import MLP, MLPSubmodules
from mcore.transformer.norm import RMSNorm, norm_class
from mcore.transformer.spec import IdentityOp, ModuleSpec


def mla_attention_spec(config: TransformerConfig) -> ModuleSpec:
    """Multi-latent attention (``mcore.transformer.mla``) with its standard parts."""
    return ModuleSpec(MultiLatentAttention, submodules=mla_submodules())


def attention_spec(config: TransformerConfig) -> ModuleSpec:
    """The config's self-attention: MLA with ``multi_latent_attention``, else fused-QKV GQA."""
    if config.multi_latent_attention:
        return mla_attention_spec(config)
    qk_norm = RMSNorm if config.attention.qk_norm else IdentityOp
    return ModuleSpec(SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear, core_attention=CoreAttention,
        linear_proj=RowParallelLinear, q_layernorm=qk_norm, k_layernorm=qk_norm))


def mlp_spec(config: TransformerConfig) -> ModuleSpec:
    return ModuleSpec(MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                    linear_fc2=RowParallelLinear))


def gpt_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The standard dense decoder layer for ``config`` (see the module docstring)."""
    norm = norm_class(config.norm)
    sandwich = norm if config.sandwich_norm else IdentityOp
    return ModuleSpec(TransformerLayer, submodules=TransformerLayerSubmodules(
        input_norm=norm, self_attention=attention_spec(config), pre_mlp_norm=norm,
        mlp=mlp_spec(config), post_attn_norm=sandwich, post_mlp_norm=sandwich))


def moe_mlp_spec(experts: str = "GroupedMLP", dispatcher: str = "AllToAllDispatcher",
                 shared_experts: ModuleSpec | None = None) -> ModuleSpec:
    """The mlp node of a MoE layer: ``MoELayer`` with routed ``experts`` ("GroupedMLP" or
    "SequentialMLP"), token ``dispatcher`` ("AllToAllDispatcher" or "AllGatherDispatcher") and
    optionally another ``shared_experts`` spec. Its ``MoEConfig`` is ``config.moe``."""
    # mcore.moe builds on mcore.transformer, so it is imported here, not at module level.
    from mcore.moe import dispatcher as dispatchers
    from mcore.moe import experts as expert_classes
    from mcore.moe.layer import MoELayer, MoESubmodules

    for name, module in (("experts", expert_classes), ("dispatcher", dispatchers)):
        value = experts if name == "experts" else dispatcher
        if not isinstance(getattr(module, value, None), type):
            raise ValueError(f"moe_mlp_spec: {name}={value!r} is not a class of {module.__name__}")
    sub = MoESubmodules(experts=getattr(expert_classes, experts),
                        dispatcher=getattr(dispatchers, dispatcher))
    if shared_experts is not None:
        sub = dataclasses.replace(sub, shared_experts=shared_experts)
    return ModuleSpec(MoELayer, submodules=sub)


def moe_layer_specs(config: TransformerConfig, layer_spec: ModuleSpec,
                    moe_mlp: ModuleSpec | None = None) -> list[ModuleSpec]:
    """One spec per layer: ``layer_spec`` with its mlp node replaced by ``moe_mlp`` (default
    ``moe_mlp_spec()``) where ``config.is_moe_layer(i)``, else ``layer_spec`` itself."""
    if config.moe.num_experts and moe_mlp is None:
        moe_mlp = moe_mlp_spec()
    moe = None
    if moe_mlp is not None:
        moe = layer_spec.replace(submodules=dataclasses.replace(layer_spec.submodules,
                                                                mlp=moe_mlp))
    return [moe if config.is_moe_layer(i) else layer_spec for i in range(config.num_layers)]


def gpt_layer_specs(config: TransformerConfig, moe_mlp: ModuleSpec | None = None
                    ) -> list[ModuleSpec]:
    """``moe_layer_specs`` of the standard layer: what ``GPTModel`` takes for any config."""
    return moe_layer_specs(config, gpt_layer_spec(config), moe_mlp)
