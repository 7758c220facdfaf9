"""mcore.transformer: configs, specs and the layers of a decoder stack (see docs/transformer.md)."""
from mcore.transformer.attention import SelfAttention, SelfAttentionSubmodules
from mcore.transformer.block import TransformerBlock
from mcore.transformer.config import (AttentionConfig, MoEConfig, ParallelConfig, PrecisionConfig,
                                      RotaryConfig, TransformerConfig)
from mcore.transformer.kv_cache import KVCache
from mcore.transformer.static_kv_cache import StaticKVCache
from mcore.transformer.layer import TransformerLayer, TransformerLayerSubmodules
from mcore.transformer.layer_specs import (gpt_layer_spec, gpt_layer_specs, moe_layer_specs,
                                           moe_mlp_spec)
from mcore.transformer.mlp import MLP, MLPSubmodules
from mcore.transformer.multi_query import (MultiQueryAttention, MultiQueryAttentionSubmodules,
                                           ReplicatedLinear)
from mcore.transformer.norm import LayerNorm, RMSNorm
from mcore.transformer.positions import LearnedPositionEmbedding, alibi_slopes
from mcore.transformer.rotary import RotaryEmbedding, apply_rotary
from mcore.transformer.spec import IdentityOp, ModuleSpec, build_module

__all__ = [
    "TransformerConfig", "RotaryConfig", "AttentionConfig", "MoEConfig", "ParallelConfig",
    "PrecisionConfig", "ModuleSpec", "build_module", "IdentityOp", "RMSNorm", "LayerNorm",
    "RotaryEmbedding", "apply_rotary", "SelfAttention", "SelfAttentionSubmodules", "MLP",
    "MLPSubmodules", "TransformerLayer", "TransformerLayerSubmodules", "TransformerBlock",
    "KVCache", "StaticKVCache", "gpt_layer_spec", "gpt_layer_specs", "moe_layer_specs",
    "moe_mlp_spec", "MultiQueryAttention", "MultiQueryAttentionSubmodules", "ReplicatedLinear",
    "LearnedPositionEmbedding", "alibi_slopes",
]
