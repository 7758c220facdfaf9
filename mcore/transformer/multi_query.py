"""Multi-query attention (one key/value head shared by every query head), tensor parallel over
the query heads with the key/value head replicated on every tp rank (StarCoder/GPTBigCode).

``SelfAttention`` splits q, k and v over tp, which needs ``num_query_groups`` divisible by tp;
a single kv head cannot be split. Here the projections are two layers:

- ``linear_q``: column-parallel ``h -> n d`` (this rank's ``n / tp`` query heads).
- ``linear_kv``: ``mcore.tensor_parallel.ReplicatedLinear`` ``h -> 2 d`` (``[k; v]``), the same full weight on every
  rank. Its input passes a ``CopyToTPRegion`` (``GatherFromSPRegion`` with sequence
  parallelism), so the input gradient it adds is summed over tp like the query path's. Each
  rank's weight gradient covers only its own query heads: with tp > 1 its parameters are
  flagged ``param.sequence_parallel`` and ``mcore.distributed.finalize`` sums them over tp
  (the tp=1 gradient, identical on every rank).
- ``core_attention`` (``CoreAttention``, ALiBi slopes when ``config.position_embedding`` is
  "alibi"), ``linear_proj`` row-parallel ``n d -> h``.

Requires ``config.num_query_groups == 1``. Rotary is applied only with "rope". Forward as
``SelfAttention``: ``x [b, s, h]``, ``cos, sin``, ``key_mask [b, t]``, ``cache`` -> ``[b, s, h]``;
the cache holds ``[b, 1, t, d]`` per layer on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn, ops

from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.layers import divide
from mcore.tensor_parallel.mappings import CopyToTPRegion, GatherFromSPRegion
from mcore.transformer.attention import alibi_kwargs
from mcore.transformer.config import TransformerConfig
from mcore.transformer.norm import mark_sequence_parallel
from mcore.transformer.rotary import apply_rotary
from mcore.transformer.spec import build_module


@dataclass
class MultiQueryAttentionSubmodules:
    linear_q: object
    linear_kv: object
    core_attention: object
    linear_proj: object


class MultiQueryAttention(nn.Cell):
    """See the module docstring."""

    def __init__(self, config: TransformerConfig, submodules: MultiQueryAttentionSubmodules,
                 layer_number: int = 0, groups: ModelGroups | None = None):
        super().__init__()
        tp_group = (groups or ModelGroups()).tp
        if (groups or ModelGroups()).cp.size > 1:
            raise ValueError("MultiQueryAttention does not run context parallel (groups.cp of size "
                             "> 1): only SelfAttention has the cp schemes")
        if config.num_query_groups != 1:
            raise ValueError(f"num_query_groups={config.num_query_groups}: MultiQueryAttention "
                             "needs exactly one key/value head (use SelfAttention for GQA)")
        name = f"layers.{layer_number}"
        self.num_heads = divide(config.num_attention_heads, tp_group, "MultiQueryAttention",
                                name, "num_attention_heads")
        d, h, dtype = config.head_dim, config.hidden_size, config.params_dtype
        sp = config.parallel.sequence_parallel
        bias = config.attention.qkv_bias
        self.head_dim, self.layer_number = d, layer_number
        self.interleaved = config.rotary.interleaved
        self.use_rotary = config.position_embedding == "rope"
        self.linear_q = build_module(submodules.linear_q, h, config.num_attention_heads * d,
                                     tp_group=tp_group, bias=bias, gather_output=False,
                                     sequence_parallel=sp, name=f"{name}.linear_q",
                                     params_dtype=dtype)
        self.enter_kv = GatherFromSPRegion(tp_group) if sp else CopyToTPRegion(tp_group)
        self.linear_kv = build_module(submodules.linear_kv, h, 2 * d, bias=bias,
                                      name=f"{name}.linear_kv", params_dtype=dtype)
        if tp_group.size > 1:  # each rank's gradient covers only its query heads
            mark_sequence_parallel(self.linear_kv)
        self.core_attention = build_module(submodules.core_attention, self.num_heads,
                                           config.softmax_scale,
                                           block_size=config.attention.block_size,
                                           **alibi_kwargs(config, tp_group, 1))
        self.linear_proj = build_module(submodules.linear_proj, config.num_attention_heads * d, h,
                                        tp_group=tp_group, bias=config.attention.out_bias,
                                        input_is_parallel=True, sequence_parallel=sp,
                                        name=f"{name}.linear_proj", params_dtype=dtype)

    def construct(self, x, cos, sin, key_mask=None, cache=None):
        n, d = self.num_heads, self.head_dim
        q = self.linear_q(x)  # [b, s, h] -> [b, s, n d]
        kv = self.linear_kv(self.enter_kv(x))  # [b, s, h] -> [b, s, 2 d]
        b, s = q.shape[0], q.shape[1]
        q = ops.transpose(q.reshape(b, s, n, d), (0, 2, 1, 3))  # [b, s, n d] -> [b, n, s, d]
        k, v = ops.split(kv, (d, d), -1)  # [b, s, 2 d] -> 2 x [b, s, d]
        k = k.reshape(b, 1, s, d)  # [b, s, d] -> [b, 1, s, d]
        v = v.reshape(b, 1, s, d)  # [b, s, d] -> [b, 1, s, d]
        if self.use_rotary:
            q = apply_rotary(q, cos, sin, self.interleaved)
            k = apply_rotary(k, cos, sin, self.interleaved)
        offset = None
        if cache is not None:
            k, v, offset = cache.update(self.layer_number, k, v)  # -> [b, 1, t, d]
        out = self.core_attention(q, k, v, key_mask, offset)  # [b, n, s, d]
        out = ops.transpose(out, (0, 2, 1, 3)).reshape(b, s, n * d)  # -> [b, s, n d]
        return self.linear_proj(out)  # [b, s, n d] -> [b, s, h]
