"""The one-token decoder layer: a whole Llama-style dense layer's decode step in one CPU kernel
(``DecodeLayerStep``, ``csrc/decode_layer.cc``), float32, tp = 1.

``CpuDecodeLayer(library, layer)`` is built for a ``TransformerLayer`` that ``eligible`` accepts:
RMSNorm input and pre-MLP norms, ``SelfAttention`` with a fused q|k|v projection, no q/k norms,
half-split rotary (``position_embedding == "rope"``, any rotary dim), causal attention without
ALiBi, a SwiGLU ``MLP``, no biases, float32 parameters, one tensor-parallel and one context-
parallel rank, no sequence parallelism, no MoE. ``__call__(x [b, 1, h], cos, sin [b, 1, 1, r],
key_mask [b, T], cache)`` -> ``[b, 1, h]``: the layer's ``construct`` for one new token with a
``StaticKVCache`` (the composed reference), writing the token's keys and values into the cache's
slot ``position`` in place. The layer calls it only for ``s == 1``, ``b <= LAYER_ROWS``, float32
``x``, a ``key_mask`` and a ``StaticKVCache``; every other call keeps the composed path.
Not differentiable (decoding only).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

# The kernel's products are small_matmul's (csrc/row_products.h): the same row limits. At 8 rows
# the layer kernel beat the composed step (MindSpore's MatMul) once the 5-8 row products
# prefetched w and the attention was vectorized (docs/performance.md "Batch 8").
from mcore.fusions.decode_ops import LAYER_ROWS  # noqa: F401  (the layer reads it from here)


def _same(shape, *rest):
    return shape


def _same_dtype(dtype, *rest):
    return dtype


def eligible(layer) -> bool:
    """Whether ``layer`` (a ``TransformerLayer``) is the dense case the kernel computes (see the
    module docstring)."""
    from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from mcore.transformer.attention import SelfAttention
    from mcore.transformer.mlp import MLP
    from mcore.transformer.norm import RMSNorm
    from mcore.transformer.spec import IdentityOp

    attn, mlp = layer.self_attention, layer.mlp
    if layer.is_moe or type(attn) is not SelfAttention or type(mlp) is not MLP:
        return False
    norms = (layer.input_norm, layer.pre_mlp_norm)
    if any(type(norm) is not RMSNorm or norm.weight.dtype != ms.float32 for norm in norms):
        return False
    if not (isinstance(layer.post_attn_norm, IdentityOp)
            and isinstance(layer.post_mlp_norm, IdentityOp)):
        return False
    core = attn.core_attention
    if not (attn.plain_qk and attn.use_rotary and not attn.interleaved
            and attn.cp_attention is None and core.causal and core.alibi is None):
        return False
    if mlp.activation != "swiglu" or not mlp.gated:
        return False
    linears = ((attn.linear_qkv, ColumnParallelLinear), (attn.linear_proj, RowParallelLinear),
               (mlp.linear_fc1, ColumnParallelLinear), (mlp.linear_fc2, RowParallelLinear))
    for linear, kind in linears:
        if (type(linear) is not kind or linear.bias is not None or linear.group.size != 1
                or linear.weight.dtype != ms.float32 or linear.fp16 or linear.bf16
                or getattr(linear, "sequence_parallel", False)):
            return False
    return True


class CpuDecodeLayer(nn.Cell):
    """See the module docstring. Holds no parameters: the layer's weights are passed per call."""

    def __init__(self, library: str, layer):
        super().__init__()
        attn = layer.self_attention
        self.slot = layer.layer_number
        self.scalars = Tensor([layer.input_norm.eps, layer.pre_mlp_norm.eps,
                               attn.core_attention.scale], ms.float32)
        self.kernel = ops.Custom(f"{library}:DecodeLayerStep", out_shape=_same,
                                 out_dtype=_same_dtype, func_type="aot")

    def construct(self, x, cos, sin, key_mask, cache, weights):
        slot = self.slot - cache.first  # global layer number -> the cache's slot
        w_in, w_qkv, w_proj, w_mlp, w_fc1, w_fc2 = weights
        return self.kernel(x, cos, sin, key_mask.astype(ms.int32), cache.position,
                           cache.keys[slot], cache.values[slot], w_in, w_qkv, w_proj, w_mlp,
                           w_fc1, w_fc2, self.scalars)
