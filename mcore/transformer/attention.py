"""Self-attention with grouped key/value heads (MHA, GQA, MQA), tensor parallel over heads.

Submodules (``SelfAttentionSubmodules``, built with ``build_module``):

- ``linear_qkv``: one column-parallel projection ``h -> (n + 2 n_kv) d`` (fused q, k, v).
  Its weight on rank r is ``[q_r; k_r; v_r]``: the rank's query heads, then its key heads,
  then its value heads (``n / tp``, ``n_kv / tp`` heads each), so loaders shard q, k and v
  separately and concatenate.
- ``q_layernorm`` / ``k_layernorm``: per-head norms over ``d`` before rotary (Qwen3 QK-norm);
  ``IdentityOp`` when absent. Their weights are replicated over tp but each rank's gradient
  covers only its own heads: with tp > 1 they are flagged ``param.sequence_parallel`` so that
  ``mcore.distributed.finalize`` sums them over tp (as Megatron sums ``q_layernorm`` /
  ``k_layernorm`` with the sequence-parallel norms), with or without sequence parallelism.
- ``core_attention``: ``mcore.fusions.attention.CoreAttention`` (fused where the device has it).
  With ``config.position_embedding == "alibi"`` it is built with this rank's ALiBi slopes
  (``alibi_slopes=``, ``num_kv_heads=``); rotary is applied only with "rope".
- ``linear_proj``: row-parallel output projection ``n d -> h``.

Groups: ``groups.tp`` (``ModelGroups``; None = single process). Parameters are created in
``config.params_dtype``.

Context parallelism (``groups.cp`` of size > 1): ``x`` holds this rank's ``s / cp`` tokens of
each sequence in the load-balanced order of ``mcore.context_parallel`` (and ``cos, sin`` their
positions); the core attention is replaced by the scheme ``config.parallel.context_parallel_comm``
names (``mcore.transformer.context_parallel.CPAttention``: ``"a2a"`` runs ``core_attention``
on a head split of the whole sequence, ``"ring"`` passes key/value blocks around the cp group).
No ``key_mask``, no ``cache`` and no ALiBi then (``ValueError``).

Forward: ``x [b, s, h]``, rotary ``cos, sin [b, 1, s, r]`` (unused unless "rope"), optional
``key_mask [b, t]``, ``cache`` (``KVCache`` in PyNative, ``StaticKVCache`` also under jit) and
``bias`` (an additive score bias ``[b or 1, n / tp, s, t]`` for this rank's heads, e.g. T5's
relative position bias; not with context parallelism) -> ``[b, s, h]``.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn, ops

from mcore.parallel_state import ModelGroups
from mcore.transformer.config import TransformerConfig
from mcore.transformer.context_parallel import CPAttention
from mcore.transformer.norm import mark_sequence_parallel
from mcore.transformer.positions import alibi_slopes_for_rank
from mcore.transformer.rotary import ApplyRotary
from mcore.transformer.spec import IdentityOp, build_module


def alibi_kwargs(config: TransformerConfig, tp_group, num_kv: int) -> dict:
    """Extra core-attention arguments: this rank's ALiBi slopes when the config uses ALiBi."""
    if config.position_embedding != "alibi":
        return {}
    return {"alibi_slopes": alibi_slopes_for_rank(config.num_attention_heads, tp_group.size,
                                                  tp_group.rank), "num_kv_heads": num_kv}


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: object
    core_attention: object
    linear_proj: object
    q_layernorm: object = IdentityOp
    k_layernorm: object = IdentityOp


class SelfAttention(nn.Cell):
    """Multi-head self-attention; see the module docstring for shapes and weight layout."""

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules,
                 layer_number: int = 0, groups: ModelGroups | None = None):
        super().__init__()
        groups = groups or ModelGroups()
        tp_group, self.cp_group = groups.tp, groups.cp
        dtype = config.params_dtype
        config.check_tp(tp_group.size)
        if self.cp_group.size > 1 and config.position_embedding == "alibi":
            raise ValueError("position_embedding='alibi' is not supported with context "
                             "parallelism (groups.cp of size > 1)")
        self.layer_number = layer_number
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp_group.size  # local query heads
        self.num_kv = config.num_query_groups // tp_group.size  # local key/value heads
        self.interleaved = config.rotary.interleaved
        self.use_rotary = config.position_embedding == "rope"
        self.rotary = ApplyRotary(self.interleaved)
        d, h = config.head_dim, config.hidden_size
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * d
        sp = config.parallel.sequence_parallel
        self.linear_qkv = build_module(submodules.linear_qkv, h, qkv_size, tp_group=tp_group,
                                       bias=config.attention.qkv_bias, gather_output=False,
                                       sequence_parallel=sp,
                                       partitions=(config.num_attention_heads * d,
                                                   config.num_query_groups * d,
                                                   config.num_query_groups * d),
                                       name=f"layers.{layer_number}.linear_qkv",
                                       params_dtype=dtype)
        self.q_layernorm = build_module(submodules.q_layernorm, d, eps=config.norm_eps, dtype=dtype)
        self.k_layernorm = build_module(submodules.k_layernorm, d, eps=config.norm_eps, dtype=dtype)
        if tp_group.size > 1:  # each rank's gradient covers only its heads: summed over tp
            mark_sequence_parallel(self.q_layernorm)
            mark_sequence_parallel(self.k_layernorm)
        self.core_attention = build_module(submodules.core_attention, self.num_heads,
                                           config.softmax_scale,
                                           block_size=config.attention.block_size,
                                           **alibi_kwargs(config, tp_group, self.num_kv))
        self.linear_proj = build_module(submodules.linear_proj, config.num_attention_heads * d, h,
                                        tp_group=tp_group, bias=config.attention.out_bias,
                                        input_is_parallel=True, sequence_parallel=sp,
                                        name=f"layers.{layer_number}.linear_proj",
                                        params_dtype=dtype)
        # no per-head q/k norms: the one-token step may rotate queries and keys together
        self.plain_qk = (isinstance(self.q_layernorm, IdentityOp)
                         and isinstance(self.k_layernorm, IdentityOp))
        self.cp_attention = None
        if self.cp_group.size > 1:  # ValueError when the a2a scheme cannot split the heads
            self.cp_attention = CPAttention(config.parallel.context_parallel_comm, self.cp_group,
                                            self.core_attention, self.num_heads, self.num_kv)

    def construct(self, x, cos, sin, key_mask=None, cache=None, bias=None):
        n, n_kv, d = self.num_heads, self.num_kv, self.head_dim
        qkv = self.linear_qkv(x)  # [b, s, h] -> [b, s, (n + 2 n_kv) d]
        b, s = qkv.shape[0], qkv.shape[1]  # full s also when x is sequence-parallel
        if s == 1 and self.plain_qk:
            q, k, v = self._one_token_qkv(qkv, cos, sin)
        else:
            q, k, v = ops.split(qkv, (n * d, n_kv * d, n_kv * d), -1)
            q = q.reshape(b, s, n, d)  # [b, s, n d] -> [b, s, n, d]
            k = k.reshape(b, s, n_kv, d)  # [b, s, n_kv d] -> [b, s, n_kv, d]
            v = v.reshape(b, s, n_kv, d)  # [b, s, n_kv d] -> [b, s, n_kv, d]
            q = ops.transpose(self.q_layernorm(q), (0, 2, 1, 3))  # [b, s, n, d] -> [b, n, s, d]
            k = ops.transpose(self.k_layernorm(k), (0, 2, 1, 3))  # [b, s, n_kv, d] -> [b, n_kv, s, d]
            v = ops.transpose(v, (0, 2, 1, 3))  # [b, s, n_kv, d] -> [b, n_kv, s, d]
            if self.use_rotary:
                q = self.rotary(q, cos, sin)
                k = self.rotary(k, cos, sin)
        if self.cp_group.size > 1:  # s = this rank's s_global / cp tokens
            if cache is not None or key_mask is not None or bias is not None:
                raise ValueError("SelfAttention: context parallelism (groups.cp) trains on whole "
                                 "causal sequences: no KV cache (decode with a model built "
                                 "without cp, same weights), no key_mask (packed samples) and "
                                 "no attention bias")
            out = self.cp_attention(q, k, v)  # [b, n, s, d]
        else:
            offset = None
            if cache is not None:
                k, v, offset = cache.update(self.layer_number, k, v)  # -> [b, n_kv, t, d]
            if bias is None:
                out = self.core_attention(q, k, v, key_mask, offset)  # [b, n, s, d]
            else:
                out = self.core_attention(q, k, v, key_mask, offset, bias)  # [b, n, s, d]
        if s == 1:  # [b, n, 1, d] and [b, 1, n, d] share one memory layout
            out = out.reshape(b, 1, n * d)  # [b, n, 1, d] -> [b, 1, n d]
        else:
            out = ops.transpose(out, (0, 2, 1, 3)).reshape(b, s, n * d)  # -> [b, s, n d]
        return self.linear_proj(out)  # [b, s, n d] -> [b, s, h]

    def _one_token_qkv(self, qkv, cos, sin):
        """The decode step's ``q [b, n, 1, d]``, ``k``, ``v [b, n_kv, 1, d]`` from ``qkv [b, 1,
        (n + 2 n_kv) d]`` without transposes (with one token, ``[b, 1, heads, d]`` and ``[b,
        heads, 1, d]`` share one memory layout) and with one rotary for the queries and keys
        together (the same element-wise arithmetic as rotating them apart)."""
        n, n_kv, d = self.num_heads, self.num_kv, self.head_dim
        b = qkv.shape[0]
        heads = qkv.reshape(b, n + 2 * n_kv, 1, d)  # [b, 1, (n + 2 n_kv) d] -> [b, heads, 1, d]
        qk, v = ops.split(heads, (n + n_kv, n_kv), 1)  # [b, n + n_kv, 1, d], [b, n_kv, 1, d]
        if self.use_rotary:
            qk = self.rotary(qk, cos, sin)
        q, k = ops.split(qk, (n, n_kv), 1)  # [b, n, 1, d], [b, n_kv, 1, d]
        return q, k, v
