"""Context-parallel attention: the sequence is split over the ``cp`` group; two ways to attend.

Layout contract (Megatron's causal load balance). The full sequence of ``s`` tokens is cut
into ``2 * P`` equal chunks (``P`` = cp group size). Rank ``r`` holds chunk ``r`` followed by
chunk ``2P - 1 - r``, so ``s_local = s / P`` and every rank does the same amount of causal
attention work. q is ``[b, n, s_local, d]``, k / v ``[b, n_kv, s_local, d]`` (``n`` divisible by
``n_kv``); the output is ``[b, n, s_local, d]`` in the same local token order. The attention is
causal over the ORIGINAL (unsplit) positions. With ``P == 1`` both schemes are plain causal
attention of the local tensors.

Schemes (``kind``):

- ``"a2a"`` (Ulysses, ``A2AAttention``): an all-to-all turns the sequence split into a head
  split (``[b, n, s/P, d] -> [b, n/P, s, d]``), the gathered chunks are put back in the original
  token order so the mask is the plain causal one, the ``CoreAttention`` runs on ``n/P`` heads of
  the full sequence, and the reverse all-to-all brings the local tokens back. Needs ``n``
  divisible by ``P``; key/value heads are either divisible by ``P`` or (``P % n_kv == 0``) each is
  replicated ``P / n_kv`` times before the exchange. Backward: the reverse all-to-alls
  (``mcore.comm.DifferentiableAllToAll``).
- ``"ring"`` (``mcore.transformer.cp_ring.RingAttention``): key/value blocks travel around the
  ring, partial results merge with the log-sum-exp rule; no rank holds the full sequence's
  keys and values. See that module.

Use the Cells (``CPAttention``, ``A2AAttention``, ``RingAttention``) inside models and compiled
code; the functions ``a2a_attention`` / ``ring_attention`` build one and call it (PyNative).
Padding / segment masks and KV caches are not supported here (the caller refuses them).
"""
from __future__ import annotations

from mindspore import nn, ops

from mcore.comm import DifferentiableAllToAll
from mcore.fusions.attention import CoreAttention
from mcore.parallel_state import ProcessGroup
from mcore.transformer.cp_ring import RingAttention, ring_attention

CP_KINDS = ("ring", "a2a")


def local_chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two of the ``2 * cp`` sequence chunks that ``rank`` holds, in local order."""
    return rank, 2 * cp - 1 - rank


def gathered_to_original(cp: int) -> list[int]:
    """Slot order that turns the rank-order concatenation of every rank's local chunks
    (slots ``2r, 2r + 1`` = chunks ``r, 2cp - 1 - r``) into the original chunk order."""
    slot_of = {}
    for r in range(cp):
        first, second = local_chunk_ids(r, cp)
        slot_of[first], slot_of[second] = 2 * r, 2 * r + 1
    return [slot_of[c] for c in range(2 * cp)]


def original_to_gathered(cp: int) -> list[int]:
    """Inverse of ``gathered_to_original``: chunk ids in rank-order slot order."""
    order = []
    for r in range(cp):
        order.extend(local_chunk_ids(r, cp))
    return order


def take_chunks(x, order, chunk: int, dim: int = 2):
    """Concatenate the ``chunk``-long slices ``order[0], order[1], ...`` of ``x`` along ``dim``
    (plain slices and a concat: differentiable and jit-safe)."""
    lead = (slice(None),) * dim
    parts = [x[lead + (slice(i * chunk, (i + 1) * chunk),)] for i in order]
    return ops.cat(parts, axis=dim)


def check_heads(kind: str, num_heads: int, num_kv_heads: int, cp: int) -> None:
    """ValueError naming the numbers when ``kind`` cannot split these heads over ``cp``."""
    if kind not in CP_KINDS:
        raise ValueError(f"context parallel: kind (parallel.cp_comm) must be one of {CP_KINDS}, "
                         f"got {kind!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"context parallel: {num_heads} query heads are not a multiple of "
                         f"{num_kv_heads} key/value heads")
    if kind == "a2a" and cp > 1:
        if num_heads % cp:
            raise ValueError(f"context parallel a2a: {num_heads} attention heads (per tensor-"
                             f"parallel rank) are not divisible by cp={cp}; use "
                             f"parallel.cp_comm=ring")
        if num_kv_heads % cp and cp % num_kv_heads:
            raise ValueError(f"context parallel a2a: {num_kv_heads} key/value heads neither "
                             f"divide nor are divisible by cp={cp}; use parallel.cp_comm=ring")


class A2AAttention(nn.Cell):
    """Ulysses context-parallel attention (see the module docstring for shapes and layout).

    ``core_attention``: a ``mcore.fusions.attention.CoreAttention`` (or any Cell with the call
    ``core_attention(q, k, v) -> out`` that applies the plain causal mask); it sees
    ``[b, n/P, s, d]`` queries and ``[b, max(n_kv/P, 1), s, d]`` keys/values of the full sequence.
    """

    def __init__(self, cp_group: ProcessGroup, core_attention):
        super().__init__()
        self.cp = cp_group
        self.core_attention = core_attention
        # sequence-split -> head-split: split heads (dim 1), concatenate tokens (dim 2)
        self.to_heads_q = DifferentiableAllToAll(cp_group, split_dim=1, concat_dim=2)
        self.to_heads_k = DifferentiableAllToAll(cp_group, split_dim=1, concat_dim=2)
        self.to_heads_v = DifferentiableAllToAll(cp_group, split_dim=1, concat_dim=2)
        self.to_tokens = DifferentiableAllToAll(cp_group, split_dim=2, concat_dim=1)
        p = cp_group.size
        self.to_original = gathered_to_original(p)
        self.to_gathered = original_to_gathered(p)

    def _replicate_kv(self, x):
        """[b, n_kv, s, d] -> [b, P, s, d] with each head repeated P / n_kv times (n_kv < P)."""
        b, n_kv, s, d = x.shape
        rep = self.cp.size // n_kv
        x = ops.broadcast_to(x.reshape(b, n_kv, 1, s, d), (b, n_kv, rep, s, d))
        return x.reshape(b, n_kv * rep, s, d)  # [b, n_kv, rep, s, d] -> [b, P, s, d]

    def construct(self, q, k, v):
        p = self.cp.size
        if p == 1:
            return self.core_attention(q, k, v)
        check_heads("a2a", q.shape[1], k.shape[1], p)
        if k.shape[1] < p:
            k, v = self._replicate_kv(k), self._replicate_kv(v)
        chunk = q.shape[2] // 2
        # [b, n, s/P, d] -> [b, n/P, s, d], chunks in rank order -> original order
        q = take_chunks(self.to_heads_q(q), self.to_original, chunk)
        k = take_chunks(self.to_heads_k(k), self.to_original, chunk)
        v = take_chunks(self.to_heads_v(v), self.to_original, chunk)
        out = self.core_attention(q, k, v)  # [b, n/P, s, d], plain causal mask
        out = take_chunks(out, self.to_gathered, chunk)  # original order -> rank order
        return self.to_tokens(out)  # [b, n/P, s, d] -> [b, n, s/P, d]


def a2a_attention(q, k, v, cp_group: ProcessGroup, core_attention):
    """Ulysses attention of the local tensors (builds an ``A2AAttention``; PyNative use)."""
    return A2AAttention(cp_group, core_attention)(q, k, v)


class CPAttention(nn.Cell):
    """Context-parallel causal attention of load-balanced local sequences, one switch.

    ``kind``: ``"ring"`` or ``"a2a"`` (``parallel.cp_comm``). ``cp_group``: the context-parallel
    ``ProcessGroup``. ``core_attention``: the layer's ``CoreAttention`` for its ``num_heads``
    heads. ``a2a`` runs a ``CoreAttention`` with the same scale, block size and fused choice on
    ``num_heads / P`` heads of the full sequence; ``ring`` uses only its ``scale`` and ``block_size``
    (it computes its partial attentions itself). ``num_heads`` / ``num_kv_heads`` (this tensor-parallel
    rank's) are checked at build time: ``ValueError`` naming ``parallel.cp_comm`` when ``a2a``
    cannot split them; ALiBi slopes on ``core_attention`` are refused (not supported with cp).

    ``construct(q, k, v)``: q ``[b, n, s_local, d]``, k / v ``[b, n_kv, s_local, d]`` with
    ``s_local`` even, each rank holding chunks ``r`` and ``2P-1-r`` (``local_chunk_ids``) ->
    ``[b, n, s_local, d]``, causal over the original positions. No key mask, no KV cache.
    """

    def __init__(self, kind: str, cp_group: ProcessGroup, core_attention, num_heads: int,
                 num_kv_heads: int):
        super().__init__()
        check_heads(kind, num_heads, num_kv_heads, cp_group.size)
        if getattr(core_attention, "alibi", None) is not None:
            raise ValueError("context parallel: ALiBi position biases are not supported with "
                             "parallel.cp > 1")
        self.kind = kind
        if kind == "a2a":
            if isinstance(core_attention, CoreAttention):  # the same attention on n / P heads
                core_attention = CoreAttention(num_heads // cp_group.size, core_attention.scale,
                                               core_attention.block_size,
                                               use_fused=core_attention.use_fused)
            self.impl = A2AAttention(cp_group, core_attention)
        else:
            self.impl = RingAttention(cp_group, core_attention.scale,
                                      getattr(core_attention, "block_size", 1024))

    def construct(self, q, k, v):
        return self.impl(q, k, v)


__all__ = ["CP_KINDS", "CPAttention", "A2AAttention", "RingAttention", "a2a_attention",
           "ring_attention", "local_chunk_ids", "gathered_to_original", "original_to_gathered",
           "take_chunks", "check_heads"]
