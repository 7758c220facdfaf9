"""Cross-attention (encoder-decoder attention), tensor parallel over heads.

Queries come from the decoder state ``x [b, s, h]``, keys and values from the encoder output
``memory [b, t, h]``; every query sees every key that ``key_mask [b, t]`` (1 = real, 0 =
encoder padding) keeps: no causal mask, no positions. Submodules (``CrossAttentionSubmodules``):

- ``linear_q``: column-parallel ``h -> n d`` (this rank's ``n / tp`` query heads);
- ``linear_kv``: column-parallel ``h -> 2 n_kv d``; its weight on rank r is ``[k_r; v_r]``
  (``partitions``: loaders shard k and v separately and concatenate);
- ``core_attention``: ``CoreAttention(causal=False)`` (the composed path);
- ``linear_proj``: row-parallel ``n d -> h``.

With ``config.num_query_groups`` < n the heads are grouped as in ``SelfAttention``. Scale:
``config.softmax_scale`` (T5: ``attention.softmax_scale=1.0``). Forward
``(x, memory, key_mask=None, bias=None) -> [b, s, h]``; ``bias``: an additive score bias
``[b or 1, n / tp or 1, s or 1, t]``. Groups: ``groups.tp`` (``ModelGroups``; None = single
process); no sequence or context parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from mindspore import nn, ops

from mcore.fusions.attention import CoreAttention
from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.transformer.config import TransformerConfig
from mcore.transformer.spec import build_module


@dataclass
class CrossAttentionSubmodules:
    linear_q: object = ColumnParallelLinear
    linear_kv: object = ColumnParallelLinear
    core_attention: object = partial(CoreAttention, causal=False)
    linear_proj: object = RowParallelLinear


class CrossAttention(nn.Cell):
    """Decoder-to-encoder attention; see the module docstring for shapes and weight layout."""

    def __init__(self, config: TransformerConfig,
                 submodules: CrossAttentionSubmodules | None = None, layer_number: int = 0,
                 groups: ModelGroups | None = None):
        super().__init__()
        submodules = submodules or CrossAttentionSubmodules()
        groups = groups or ModelGroups()
        tp_group = groups.tp
        if config.parallel.sequence_parallel or groups.cp.size > 1:
            raise ValueError("CrossAttention: sequence or context parallelism is not supported")
        config.check_tp(tp_group.size)
        d, h = config.head_dim, config.hidden_size
        n, n_kv = config.num_attention_heads, config.num_query_groups
        self.head_dim = d
        self.num_heads, self.num_kv = n // tp_group.size, n_kv // tp_group.size  # local heads
        dtype = config.params_dtype
        self.linear_q = build_module(submodules.linear_q, h, n * d, tp_group=tp_group,
                                     bias=config.attention.qkv_bias, gather_output=False,
                                     name=f"layers.{layer_number}.cross_q", params_dtype=dtype)
        self.linear_kv = build_module(submodules.linear_kv, h, 2 * n_kv * d, tp_group=tp_group,
                                      bias=config.attention.qkv_bias, gather_output=False,
                                      partitions=(n_kv * d, n_kv * d),
                                      name=f"layers.{layer_number}.cross_kv", params_dtype=dtype)
        self.core_attention = build_module(submodules.core_attention, self.num_heads,
                                           config.softmax_scale,
                                           block_size=config.attention.block_size,
                                           num_kv_heads=self.num_kv)
        self.linear_proj = build_module(submodules.linear_proj, n * d, h, tp_group=tp_group,
                                        bias=config.attention.out_bias, input_is_parallel=True,
                                        name=f"layers.{layer_number}.cross_proj",
                                        params_dtype=dtype)

    def construct(self, x, memory, key_mask=None, bias=None):
        n, n_kv, d = self.num_heads, self.num_kv, self.head_dim
        b, s, t = x.shape[0], x.shape[1], memory.shape[1]
        q = self.linear_q(x).reshape(b, s, n, d)  # [b, s, n d] -> [b, s, n, d]
        k, v = ops.split(self.linear_kv(memory), (n_kv * d, n_kv * d), -1)  # 2 x [b, t, n_kv d]
        q = ops.transpose(q, (0, 2, 1, 3))  # [b, s, n, d] -> [b, n, s, d]
        k = ops.transpose(k.reshape(b, t, n_kv, d), (0, 2, 1, 3))  # -> [b, n_kv, t, d]
        v = ops.transpose(v.reshape(b, t, n_kv, d), (0, 2, 1, 3))  # -> [b, n_kv, t, d]
        if bias is None:
            out = self.core_attention(q, k, v, key_mask)  # [b, n, s, d]
        else:
            out = self.core_attention(q, k, v, key_mask, None, bias)  # [b, n, s, d]
        out = ops.transpose(out, (0, 2, 1, 3)).reshape(b, s, n * d)  # -> [b, s, n d]
        return self.linear_proj(out)  # [b, s, n d] -> [b, s, h]
