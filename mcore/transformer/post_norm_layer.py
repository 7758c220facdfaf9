"""PostNormTransformerLayer: one post-norm residual layer (the original Transformer / BERT order).

    h   = attn_norm(x + self_attention(x))
    out = mlp_norm(h + mlp(h))

The norm comes AFTER each residual add, so the layer output is normalised and a stack of them
needs no final norm (``TransformerBlock(..., final_norm=IdentityOp)``).
``encoder_layer_spec(config)`` builds it with bidirectional self-attention: the config's
fused-QKV ``SelfAttention`` whose core attention is ``CoreAttention(causal=False)``, so every
query sees every key; ``key_mask [b, t]`` (1 = real, 0 = padding) hides the padding keys (a
padding query still sees every real key). Shapes: ``[b, s, h] -> [b, s, h]``.

Groups: ``groups`` (a ``ModelGroups``; None = single process) goes to the attention and the
mlp unchanged: heads and the MLP's inner width are split over ``groups.tp`` as in
``TransformerLayer``; the norms act on replicated activations and are replicated.
Sequence parallelism (``config.parallel.sequence_parallel``): ``x`` and ``out`` are
``[b, s/tp, h]`` and both norms are flagged ``param.sequence_parallel``, as in
``TransformerLayer``. Mixture-of-experts mlps are not supported here (``ValueError``).
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn

from mcore.fusions.attention import CoreAttention
from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.transformer.attention import SelfAttention, SelfAttentionSubmodules
from mcore.transformer.config import TransformerConfig
from mcore.transformer.layer_specs import mlp_spec
from mcore.transformer.norm import mark_sequence_parallel, norm_class
from mcore.transformer.spec import ModuleSpec, build_module


@dataclass
class PostNormLayerSubmodules:
    self_attention: object
    attn_norm: object
    mlp: object
    mlp_norm: object


class PostNormTransformerLayer(nn.Cell):
    """One post-norm layer; see the module docstring. ``layer_number`` (0-based, global) names
    the linear layers (and so seeds their initialisation)."""

    def __init__(self, config: TransformerConfig, submodules: PostNormLayerSubmodules,
                 layer_number: int = 0, groups: ModelGroups | None = None):
        super().__init__()
        h, eps, dtype = config.hidden_size, config.norm_eps, config.params_dtype
        self.layer_number = layer_number
        self.self_attention = build_module(submodules.self_attention, config,
                                           layer_number=layer_number, groups=groups)
        self.attn_norm = build_module(submodules.attn_norm, h, eps=eps, dtype=dtype)
        self.mlp = build_module(submodules.mlp, config, groups=groups, layer_number=layer_number)
        self.mlp_norm = build_module(submodules.mlp_norm, h, eps=eps, dtype=dtype)
        if getattr(self.mlp, "returns_aux", False):
            raise ValueError("PostNormTransformerLayer: a mixture-of-experts mlp is not "
                             "supported (config.moe.num_experts must be 0)")
        self.is_moe = False
        if config.parallel.sequence_parallel:
            mark_sequence_parallel(self.attn_norm)
            mark_sequence_parallel(self.mlp_norm)

    def construct(self, x, cos=None, sin=None, key_mask=None, cache=None):
        """``[b, s, h] -> [b, s, h]``; ``cos, sin`` are used only with rotary positions."""
        h = self.attn_norm(x + self.self_attention(x, cos, sin, key_mask, cache))
        return self.mlp_norm(h + self.mlp(h))


def bidirectional_attention_spec(config: TransformerConfig) -> ModuleSpec:
    """The config's fused-QKV self-attention with ``CoreAttention(causal=False)``."""
    return ModuleSpec(SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear,
        core_attention=ModuleSpec(CoreAttention, params={"causal": False}),
        linear_proj=RowParallelLinear))


def encoder_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """A post-norm layer with bidirectional self-attention, the config's MLP and norm."""
    if config.moe.num_experts:
        raise ValueError(f"encoder_layer_spec: moe.num_experts={config.moe.num_experts}: "
                         f"encoder layers are dense")
    norm = norm_class(config.norm)
    return ModuleSpec(PostNormTransformerLayer, submodules=PostNormLayerSubmodules(
        self_attention=bidirectional_attention_spec(config), attn_norm=norm,
        mlp=mlp_spec(config), mlp_norm=norm))
