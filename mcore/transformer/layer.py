"""TransformerLayer: one pre-norm residual decoder layer, composed from a spec.

    h   = x + post_attn_norm(self_attention(input_norm(x)))
    out = h + post_mlp_norm(mlp(pre_mlp_norm(h)))

``post_attn_norm`` / ``post_mlp_norm`` are ``IdentityOp`` unless the architecture uses
"sandwich" norms (GLM-4-0414). Shapes: ``[b, s, h] -> [b, s, h]``.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn

from mcore.parallel_state import ProcessGroup
from mcore.transformer.config import TransformerConfig
from mcore.transformer.spec import IdentityOp, build_module


@dataclass
class TransformerLayerSubmodules:
    input_norm: object
    self_attention: object
    pre_mlp_norm: object
    mlp: object
    post_attn_norm: object = IdentityOp
    post_mlp_norm: object = IdentityOp


class TransformerLayer(nn.Cell):
    """One decoder layer; ``layer_number`` (0-based) indexes the KV cache."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules,
                 layer_number: int = 0, tp_group: ProcessGroup | None = None):
        super().__init__()
        h, eps = config.hidden_size, config.norm_eps
        self.layer_number = layer_number
        self.input_norm = build_module(submodules.input_norm, h, eps=eps)
        self.self_attention = build_module(submodules.self_attention, config,
                                           layer_number=layer_number, tp_group=tp_group)
        self.post_attn_norm = build_module(submodules.post_attn_norm, h, eps=eps)
        self.pre_mlp_norm = build_module(submodules.pre_mlp_norm, h, eps=eps)
        self.mlp = build_module(submodules.mlp, config, tp_group=tp_group, layer_number=layer_number)
        self.post_mlp_norm = build_module(submodules.post_mlp_norm, h, eps=eps)

    def construct(self, x, cos, sin, key_mask=None, cache=None):
        h = x + self.post_attn_norm(self.self_attention(self.input_norm(x), cos, sin, key_mask,
                                                        cache))
        return h + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h)))
