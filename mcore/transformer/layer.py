"""TransformerLayer: one pre-norm residual decoder layer, composed from a spec.

    h   = x + post_attn_norm(self_attention(input_norm(x)))
    out = h + post_mlp_norm(mlp(pre_mlp_norm(h)))

``post_attn_norm`` / ``post_mlp_norm`` are ``IdentityOp`` unless the architecture uses
"sandwich" norms (GLM-4-0414). Shapes: ``[b, s, h] -> [b, s, h]``. When ``pre_mlp_norm`` is an
``RMSNorm`` the add that forms ``h`` and that norm run as one fused op (``RMSNorm.add_and_norm``;
a CPU kernel where ``mcore.fusions`` has one, else the same composed math).

Decoding: a dense Llama-style layer (``mcore.fusions.decode_layer.eligible``) runs a one-token
float32 step of at most 8 rows with a ``key_mask`` and a ``StaticKVCache`` (and no LoRA
adapter) as ONE kernel, the registry's "decode_layer" (same result as the composed step, the
token's keys and values written into the cache in place); every other call is composed.

Groups: ``groups`` (a ``ModelGroups``; None = single process) is passed unchanged to the
attention and the mlp. Mixture of experts: when the mlp declares ``returns_aux`` (a
``mcore.moe.MoELayer``) it returns ``(y, aux [3], counts [E])``; the layer is then a MoE layer
(``is_moe``): ``construct`` still returns only ``[b, s, h]`` (inference, where the router losses
are not needed) and ``forward_with_aux`` returns ``(out [b, s, h], aux [3], counts [E])``, the
explicit channel ``TransformerBlock.forward_with_aux`` collects. Nothing is stored between calls.

Sequence parallelism (``config.parallel.sequence_parallel``): ``x`` and ``out`` are
``[b, s/tp, h]``; attention and mlp gather the sequence on entry and reduce-scatter it on exit,
and the four norms (applied to the split sequence) are flagged ``param.sequence_parallel``.
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import nn

from mcore.fusions import decode_layer
from mcore.fusions.registry import fused_cell
from mcore.parallel_state import ModelGroups
from mcore.transformer.config import TransformerConfig
from mcore.transformer.norm import RMSNorm, mark_sequence_parallel
from mcore.transformer.spec import IdentityOp, build_module
from mcore.transformer.static_kv_cache import StaticKVCache


@dataclass
class TransformerLayerSubmodules:
    input_norm: object
    self_attention: object
    pre_mlp_norm: object
    mlp: object
    post_attn_norm: object = IdentityOp
    post_mlp_norm: object = IdentityOp


class TransformerLayer(nn.Cell):
    """One decoder layer; ``layer_number`` (0-based, global) indexes the KV cache."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules,
                 layer_number: int = 0, groups: ModelGroups | None = None):
        super().__init__()
        h, eps, dtype = config.hidden_size, config.norm_eps, config.params_dtype
        self.layer_number = layer_number
        self.input_norm = build_module(submodules.input_norm, h, eps=eps, dtype=dtype)
        self.self_attention = build_module(submodules.self_attention, config,
                                           layer_number=layer_number, groups=groups)
        self.post_attn_norm = build_module(submodules.post_attn_norm, h, eps=eps, dtype=dtype)
        self.pre_mlp_norm = build_module(submodules.pre_mlp_norm, h, eps=eps, dtype=dtype)
        self.mlp = build_module(submodules.mlp, config, groups=groups, layer_number=layer_number)
        self.post_mlp_norm = build_module(submodules.post_mlp_norm, h, eps=eps, dtype=dtype)
        self.is_moe = bool(getattr(self.mlp, "returns_aux", False))
        self.fuse_add_norm = (isinstance(self.pre_mlp_norm, RMSNorm)
                              and self.pre_mlp_norm.fuse_residual_add())
        if config.parallel.sequence_parallel:
            for norm in (self.input_norm, self.post_attn_norm, self.pre_mlp_norm,
                         self.post_mlp_norm):
                mark_sequence_parallel(norm)
        # the one-token step over a StaticKVCache as one kernel (registry "decode_layer")
        kernel = fused_cell("decode_layer", layer=self) if decode_layer.eligible(self) else None
        self.use_decode_kernel = kernel is not None
        if self.use_decode_kernel:
            self.decode_kernel = kernel

    def recompute_parts(self) -> None:
        """Recompute attention and mlp in the backward pass (``TransformerBlock`` uses this for
        MoE layers, whose ``forward_with_aux`` bypasses ``construct`` and so ``Cell.recompute``)."""
        self.self_attention.recompute()
        self.mlp.recompute()

    def _attention(self, x, cos, sin, key_mask, cache):
        """``(h, pre_mlp_norm(h))`` with ``h = x + post_attn_norm(attention(input_norm(x)))``."""
        out = self.post_attn_norm(self.self_attention(self.input_norm(x), cos, sin, key_mask,
                                                      cache))
        if self.fuse_add_norm:
            return self.pre_mlp_norm.add_and_norm(x, out)
        h = x + out
        return h, self.pre_mlp_norm(h)

    def construct(self, x, cos, sin, key_mask=None, cache=None):
        """``[b, s, h] -> [b, s, h]`` (a MoE layer's router losses are dropped here)."""
        if self.is_moe:
            return self.forward_with_aux(x, cos, sin, key_mask, cache)[0]
        if self.use_decode_kernel:  # a Python constant: the branch is dropped when False
            if (cache is not None and key_mask is not None and x.shape[1] == 1
                    and x.shape[0] <= decode_layer.LAYER_ROWS and x.dtype == ms.float32
                    and isinstance(cache, StaticKVCache) and self._no_adapters()):
                return self._decode_step(x, cos, sin, key_mask, cache)
        h, normed = self._attention(x, cos, sin, key_mask, cache)
        return h + self.post_mlp_norm(self.mlp(normed))

    def _decode_step(self, x, cos, sin, key_mask, cache):
        """The one-token step as one kernel (``use_decode_kernel`` only): ``[b, 1, h]``."""
        attn, mlp = self.self_attention, self.mlp
        weights = (self.input_norm.weight, attn.linear_qkv.weight, attn.linear_proj.weight,
                   self.pre_mlp_norm.weight, mlp.linear_fc1.weight, mlp.linear_fc2.weight)
        return self.decode_kernel(x, cos, sin, key_mask, cache, weights)  # [b, 1, h]

    def _no_adapters(self) -> bool:
        """No LoRA adapter on the linear layers (attached after build: the kernel has none)."""
        attn, mlp = self.self_attention, self.mlp
        return (attn.linear_qkv.lora is None and attn.linear_proj.lora is None
                and mlp.linear_fc1.lora is None and mlp.linear_fc2.lora is None)

    def forward_with_aux(self, x, cos, sin, key_mask=None, cache=None):
        """MoE layers only: ``-> (out [b, s, h], aux [3], counts [E])`` (see the module docstring)."""
        h, normed = self._attention(x, cos, sin, key_mask, cache)
        y, aux, counts = self.mlp(normed)
        return h + self.post_mlp_norm(y), aux, counts
