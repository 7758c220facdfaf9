"""Multi-latent attention (MLA, DeepSeek-V2/V3), tensor parallel over heads.

Sizes (``config.mla``): ``n`` heads, ``dn = qk_nope_head_dim``, ``dr = qk_rope_head_dim``,
``dq = dn + dr``, ``dv = v_head_dim``, ``r = kv_lora_rank``, ``rq = q_lora_rank``. For
``x [b, s, h]``::

    q      = up_q(norm_q(down_q(x)))  [b, s, n dq]   (or q_proj(x) when q_lora_rank is None)
    q_nope, q_pe = q per head split [dn, dr];       q_pe = rope(q_pe)
    c, k_pe = down_kv(x) split [r, dr];  c = norm_kv(c);  k_pe = rope(k_pe)  (ONE head, shared)
    k_nope, v = up_kv(c) per head split [dn, dv]
    k      = [k_nope, k_pe] (k_pe broadcast to every head);  q = [q_nope, q_pe]
    out    = o_proj(softmax(q k^T * scale + causal) v)     [b, s, h]

``scale`` is ``config.softmax_scale`` (``dq ** -0.5``, with DeepSeek's YaRN ``mscale ** 2``).
Rotary (``config.rotary``): ``interleaved=True`` rotates the pairs ``(2i, 2i + 1)``
(DeepSeek's checkpoints; Hugging Face de-interleaves and rotates halves, which permutes
``q_pe`` and ``k_pe`` alike and so leaves every score unchanged).

Submodules (``MLASubmodules``; Hugging Face names in brackets): ``linear_q_proj`` [q_proj],
``linear_q_down_proj`` [q_a_proj], ``q_layernorm`` [q_a_layernorm], ``linear_q_up_proj``
[q_b_proj], ``linear_kv_down_proj`` [kv_a_proj_with_mqa], ``kv_layernorm`` [kv_a_layernorm],
``linear_kv_up_proj`` [kv_b_proj], ``core_attention``, ``linear_proj`` [o_proj]. The up-
projection rows are per head ``[q_nope; q_pe]`` and ``[k_nope; v]``, as in the checkpoints.

Tensor parallel (``groups.tp``, ``P`` ranks): the query and key/value up-projections are
column-parallel (``n / P`` heads per rank), ``linear_proj`` is row-parallel, and the
down-projections and the latent norms are replicated (``ReplicatedLinear``). Their input
gradients are partial per rank (one rank sees its heads only) and are summed over tp where
the replicated part meets the parallel part: by the up-projections' ``CopyToTPRegion`` for the
latents and by a ``CopyToTPRegion`` on ``k_pe``; the replicated weights then get the full
gradient on every rank, with no finaliser work. Sequence parallelism: ``x`` is
``[b, s/P, h]``; the down-projections and norms run on the local sequence (their weights
flagged ``param.sequence_parallel``, summed over tp by the finaliser), and the latents and
``k_pe`` are all-gathered along the sequence before the per-head part.

Caches (``cache`` argument): a plain ``KVCache`` / ``StaticKVCache`` receives the expanded
per-head ``k [b, n/P, t, dq]`` and ``v [b, n/P, t, dv]``; a latent cache (``cache.latent``,
``mcore.transformer.latent_cache``) stores only ``[c, k_pe]`` per token and attention runs in
the latent space with ``W_uk, W_uv`` (the rows of ``linear_kv_up_proj`` per head) absorbed::

    q_lat = q_nope @ W_uk           [b, n, s, r];   scores = [q_lat, q_pe] . [c, k_pe]
    o_lat = softmax(scores) @ c     [b, n, s, r];   out_head = o_lat @ W_uv^T  [b, n, s, dv]

which is the same attention (``q_nope . (W_uk^T c) = (q_nope W_uk) . c``). Latent caches and
sequence parallelism do not mix (decoding feeds one token at a time).
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn, ops

from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.mappings import CopyToTPRegion, GatherFromSPRegion
from mcore.transformer.config import TransformerConfig
from mcore.transformer.norm import mark_sequence_parallel
from mcore.transformer.rotary import apply_rotary
from mcore.transformer.spec import build_module


@dataclass
class MLASubmodules:
    """Specs of the MLA parts; ``linear_q_proj`` is used when ``q_lora_rank`` is None, the
    three ``q_*`` down/norm/up parts otherwise."""

    linear_q_down_proj: object
    q_layernorm: object
    linear_q_up_proj: object
    linear_kv_down_proj: object
    kv_layernorm: object
    linear_kv_up_proj: object
    core_attention: object
    linear_proj: object
    linear_q_proj: object = None


class MultiLatentAttention(nn.Cell):
    """MLA self-attention; see the module docstring for the math, shapes and tp split.

    Forward: ``x [b, s, h]`` (``[b, s/tp, h]`` with sequence parallelism), rotary
    ``cos, sin [b, 1, s, qk_rope_head_dim]``, optional ``key_mask [b, t]`` and ``cache`` ->
    ``[b, s, h]`` (same split as ``x``).
    """

    def __init__(self, config: TransformerConfig, submodules: MLASubmodules,
                 layer_number: int = 0, groups: ModelGroups | None = None):
        super().__init__()
        if not config.multi_latent_attention:
            raise ValueError("multi_latent_attention=False: MultiLatentAttention needs it set "
                             "(with config.mla sizes)")
        tp_group = (groups or ModelGroups()).tp
        if (groups or ModelGroups()).cp.size > 1:
            raise ValueError("MultiLatentAttention does not run context parallel (groups.cp of size "
                             "> 1): only SelfAttention has the cp schemes")
        config.check_tp(tp_group.size)
        m, dtype, h = config.mla, config.params_dtype, config.hidden_size
        n = config.num_attention_heads
        sp = config.parallel.sequence_parallel
        self.layer_number = layer_number
        self.num_heads = n // tp_group.size  # local heads
        self.dn, self.dr, self.dv, self.r = (m.qk_nope_head_dim, m.qk_rope_head_dim,
                                             m.v_head_dim, m.kv_lora_rank)
        self.sequence_parallel = sp and tp_group.size > 1
        self.interleaved = config.rotary.interleaved
        self.q_lora = m.q_lora_rank is not None
        prefix = f"layers.{layer_number}.self_attention"
        bias = config.attention.qkv_bias  # DeepSeek's attention_bias (down-projections)
        column = dict(tp_group=tp_group, bias=False, gather_output=False, sequence_parallel=sp,
                      params_dtype=dtype)
        replicated = dict(sequence_parallel=self.sequence_parallel, params_dtype=dtype)
        if self.q_lora:
            self.linear_q_down_proj = build_module(submodules.linear_q_down_proj, h,
                                                   m.q_lora_rank, bias=bias,
                                                   name=f"{prefix}.linear_q_down_proj",
                                                   **replicated)
            self.q_layernorm = build_module(submodules.q_layernorm, m.q_lora_rank,
                                            eps=m.latent_norm_eps, dtype=dtype)
            self.linear_q_up_proj = build_module(submodules.linear_q_up_proj, m.q_lora_rank,
                                                 n * m.qk_head_dim,
                                                 name=f"{prefix}.linear_q_up_proj", **column)
            if self.sequence_parallel:
                mark_sequence_parallel(self.q_layernorm)
        else:
            self.linear_q_proj = build_module(submodules.linear_q_proj, h, n * m.qk_head_dim,
                                              name=f"{prefix}.linear_q_proj", **column)
        self.linear_kv_down_proj = build_module(submodules.linear_kv_down_proj, h,
                                                self.r + self.dr, bias=bias,
                                                name=f"{prefix}.linear_kv_down_proj",
                                                **replicated)
        self.kv_layernorm = build_module(submodules.kv_layernorm, self.r, eps=m.latent_norm_eps,
                                         dtype=dtype)
        if self.sequence_parallel:
            mark_sequence_parallel(self.kv_layernorm)
        self.linear_kv_up_proj = build_module(submodules.linear_kv_up_proj, self.r,
                                              n * (self.dn + self.dv),
                                              name=f"{prefix}.linear_kv_up_proj", **column)
        # k_pe: [b, s/P, dr] -> [b, s, dr] with sp; its gradient (this rank's heads) summed over tp
        self.enter_rope = GatherFromSPRegion(tp_group) if sp else CopyToTPRegion(tp_group)
        self.core_attention = build_module(submodules.core_attention, self.num_heads,
                                           config.softmax_scale,
                                           block_size=config.attention.block_size)
        self.linear_proj = build_module(submodules.linear_proj, n * self.dv, h,
                                        tp_group=tp_group, bias=config.attention.out_bias,
                                        input_is_parallel=True, sequence_parallel=sp,
                                        name=f"{prefix}.linear_proj", params_dtype=dtype)

    def _query(self, x):
        """``x`` -> rotated ``(q_nope [b, n, s, dn], q_pe [b, n, s, dr])`` (local heads)."""
        if self.q_lora:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
        else:
            q = self.linear_q_proj(x)  # [b, s, h] -> [b, s, n dq]
        b, s = q.shape[0], q.shape[1]  # full s also when x is sequence-parallel
        q = q.reshape(b, s, self.num_heads, self.dn + self.dr)  # [b, s, n dq] -> [b, s, n, dq]
        q = ops.transpose(q, (0, 2, 1, 3))  # [b, s, n, dq] -> [b, n, s, dq]
        q_nope, q_pe = ops.split(q, (self.dn, self.dr), -1)
        return q_nope, q_pe

    def construct(self, x, cos, sin, key_mask=None, cache=None):
        n, dn, dr, dv, r = self.num_heads, self.dn, self.dr, self.dv, self.r
        q_nope, q_pe = self._query(x)
        b, s = q_nope.shape[0], q_nope.shape[2]
        q_pe = apply_rotary(q_pe, cos, sin, self.interleaved)
        c, k_pe = ops.split(self.linear_kv_down_proj(x), (r, dr), -1)  # [b, s, r], [b, s, dr]
        c = self.kv_layernorm(c)
        k_pe = self.enter_rope(k_pe).reshape(b, 1, s, dr)  # [b, s, dr] -> [b, 1, s, dr]
        k_pe = apply_rotary(k_pe, cos, sin, self.interleaved)
        if cache is not None and getattr(cache, "latent", False):
            out = self._latent_attention(q_nope, q_pe, c, k_pe, key_mask, cache)
        else:
            kv = self.linear_kv_up_proj(c)  # [b, s, r] -> [b, s, n (dn + dv)]
            kv = ops.transpose(kv.reshape(b, s, n, dn + dv), (0, 2, 1, 3))  # -> [b, n, s, dn+dv]
            k_nope, v = ops.split(kv, (dn, dv), -1)
            k = ops.cat((k_nope, ops.broadcast_to(k_pe, (b, n, s, dr))), -1)  # [b, n, s, dq]
            q = ops.cat((q_nope, q_pe), -1)  # [b, n, s, dq]
            offset = None
            if cache is not None:
                k, v, offset = cache.update(self.layer_number, k, v)  # -> [b, n, t, dq / dv]
            out = self.core_attention(q, k, v, key_mask, offset)  # [b, n, s, dv]
        out = ops.transpose(out, (0, 2, 1, 3)).reshape(b, s, n * dv)  # -> [b, s, n dv]
        return self.linear_proj(out)  # [b, s, n dv] -> [b, s, h]

    def _latent_attention(self, q_nope, q_pe, c, k_pe, key_mask, cache):
        """Attention over a latent cache, ``kv_b_proj`` absorbed -> ``[b, n, s, dv]``."""
        if self.sequence_parallel:
            raise ValueError("MultiLatentAttention: a latent KV cache cannot be used with "
                             "parallel.sequence_parallel (decoding feeds one token at a time)")
        n, dn, dv, r = self.num_heads, self.dn, self.dv, self.r
        b, s = c.shape[0], c.shape[1]
        ckv = ops.cat((c.reshape(b, 1, s, r), k_pe), -1)  # [b, 1, s, r + dr]
        ckv, offset = cache.update_latent(self.layer_number, ckv)  # -> [b, 1, t, r + dr]
        w = self.linear_kv_up_proj.weight.reshape(n, dn + dv, r)  # [n (dn+dv), r] -> [n, dn+dv, r]
        w_uk, w_uv = w[:, :dn, :], w[:, dn:, :]  # [n, dn, r], [n, dv, r]
        q_lat = ops.matmul(q_nope, w_uk.astype(q_nope.dtype))  # [b, n, s, dn] @ [n, dn, r]
        q = ops.cat((q_lat, q_pe), -1)  # [b, n, s, r + dr]
        o_lat = self.core_attention(q, ckv, ckv[:, :, :, :r], key_mask, offset)  # [b, n, s, r]
        w_vt = ops.transpose(w_uv, (0, 2, 1)).astype(o_lat.dtype)  # [n, dv, r] -> [n, r, dv]
        return ops.matmul(o_lat, w_vt)  # [b, n, s, r] @ [n, r, dv] -> [b, n, s, dv]

    def latent_width(self) -> int:
        """Values one token stores per layer in a latent cache (``kv_lora_rank + dr``)."""
        return self.r + self.dr


def mla_submodules(norm=None) -> MLASubmodules:
    """The standard parts: replicated down-projections, ``norm`` (default RMSNorm) on the
    latents, column-parallel up-projections, dispatching core attention, row-parallel output."""
    from mcore.fusions.attention import CoreAttention
    from mcore.tensor_parallel.layers import (ColumnParallelLinear, ReplicatedLinear,
                                              RowParallelLinear)
    from mcore.transformer.norm import RMSNorm

    norm = norm or RMSNorm
    return MLASubmodules(linear_q_down_proj=ReplicatedLinear, q_layernorm=norm,
                         linear_q_up_proj=ColumnParallelLinear,
                         linear_kv_down_proj=ReplicatedLinear, kv_layernorm=norm,
                         linear_kv_up_proj=ColumnParallelLinear, core_attention=CoreAttention,
                         linear_proj=RowParallelLinear, linear_q_proj=ColumnParallelLinear)

