"""Ring attention: context-parallel causal attention without gathering the keys and values.

Layout: see ``mcore.transformer.context_parallel`` (rank ``r`` of ``P`` holds sequence chunks
``r`` and ``2P-1-r``, each ``c = s_local / 2`` tokens). q ``[b, n, s_local, d]``, k / v
``[b, n_kv, s_local, d]``; grouped heads are used as a ``[b, n_kv, n/n_kv, s, d]`` view of the
queries against ``[b, n_kv, 1, s, d]`` keys / values (no kv head is copied).

Forward. The local key/value block travels around the ring (rank ``r`` sends to ``r+1``,
receives from ``r-1``); at step ``i`` rank ``r`` holds the block of source ``j = (r - i) mod P``
and attends with the part of its queries that may see it (chunk indices decide, never a mask
over the full sequence):

- ``i = 0`` (its own block): plain causal attention of the local tokens (chunk ``r`` comes
  before chunk ``2P-1-r``, so the local order is monotonic);
- ``j < r``: every local query sees the block's first chunk (``j``) fully and none of its
  second (``2P-1-j > 2P-1-r``);
- ``j > r``: only the local second chunk (``2P-1-r``) sees anything, and it sees both of the
  block's chunks fully.

Each step yields a partial output ``o_i`` and log-sum-exp ``l_i`` per query row; they merge with
``l = log(e^l + e^l_i)``, ``o = o e^(l_old - l) + o_i e^(l_i - l)``.

Backward (a ``bprop``; the forward keeps only its output and ``l``). With ``D = rowsum(dO * O)``
and ``p = exp(scores - l)`` recomputed per block: ``dv = p^T dO``, ``ds = p (dO v^T - D)``,
``dq = scale ds k``, ``dk = scale ds^T q``. The key/value block travels the ring again together
with its gradient accumulator: each rank adds its contribution to the accumulator of the block
it holds and passes both on; one last shift returns every accumulator to its owner.

Exchange (``ring_shift``): a SUM all-reduce over the cp group (the only collective MindSpore
has on CPU, see ``mcore.comm``). With ``P = 2`` one call swaps the two blocks. With ``P > 2``
each rank's block is summed with zeros in its own round (``P`` rounds, one block in memory at a
time), so no rank holds every block at once; that costs ``P`` block transfers per shift.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from mcore.comm.autograd import backward_copy
from mcore.comm.collectives import _sum, zeros_of
from mcore.parallel_state import ProcessGroup

_NEG = -1.0e30


def ring_shift(x, group: ProcessGroup):
    """Send ``x`` to group rank ``r+1`` and return the ``x`` of rank ``r-1`` (mod ``P``)."""
    p, r = group.size, group.rank
    if p == 1:
        return x
    zeros = zeros_of(x)
    if p == 2:
        slots = [ops.expand_dims(x, 0), ops.expand_dims(zeros, 0)]  # [2, *x.shape]
        both = _sum(ops.cat(slots if r == 0 else slots[::-1], 0), group)
        return both[1 - r]
    out = x
    for src in range(p):
        y = _sum(x if src == r else zeros, group)
        out = y if (src + 1) % p == r else ops.depend(out, y)
    return out


# Functions with an ``if`` that run in both the forward and the bprop of one compiled graph
# need separate copies (see ``mcore.comm.autograd.backward_copy``).
_ring_shift_bwd = backward_copy(ring_shift)
_arange_bwd = backward_copy(ops.arange)


def _bias_rows(pos, start: int, stop: int):
    """Causal additive mask of query rows ``[start, stop)`` against all ``t`` keys, from the
    positions ``pos`` ``[t]`` (int32): ``[stop - start, t]``, 0 where key ``j <= query i``."""
    keep = pos.reshape(1, -1) <= pos[start:stop].reshape(-1, 1)  # [c, t]
    return ops.masked_fill(ops.zeros(keep.shape, ms.float32), ops.logical_not(keep), _NEG)


def _attend(q, k, v, scale: float, pos, block: int):
    """Partial attention: q ``[b, G, g, sq, d]``, k / v ``[b, G, 1, t, d]``; ``pos`` None (no
    mask) or the ``[t]`` positions of a causal block with ``sq == t`` -> (o ``[b, G, g, sq, d]``,
    lse ``[b, G, g, sq, 1]``). Queries go ``block`` rows at a time: at most one
    ``[b, G, g, block, t]`` score block is alive."""
    kt = ops.swapaxes(k, -1, -2)  # [b, G, 1, d, t]
    outs, lses = [], []
    sq = q.shape[3]
    for start in range(0, sq, block):
        stop = start + block if start + block < sq else sq
        scores = ops.matmul(_seq(q, start, stop) * scale, kt)  # [b, G, g, c, t]
        if pos is not None:
            scores = scores + _bias_rows(pos, start, stop)
        top = scores.max(axis=-1, keepdims=True)
        e = ops.exp(scores - top)
        total = e.sum(axis=-1, keepdims=True)
        outs.append(ops.matmul(e, v) / total)
        lses.append(top + ops.log(total))
    if len(outs) == 1:
        return outs[0], lses[0]
    return ops.cat(outs, 3), ops.cat(lses, 3)


def _merge(o, lse, o_i, lse_i):
    """Combine two partial softmax results over disjoint key sets (log-sum-exp rule)."""
    top = ops.maximum(lse, lse_i)
    new = top + ops.log(ops.exp(lse - top) + ops.exp(lse_i - top))
    return o * ops.exp(lse - new) + o_i * ops.exp(lse_i - new), new


def _block_grads(q, k, v, do, lse, delta, scale: float, pos, block: int):
    """Gradients of one block (shapes and ``pos`` as ``_attend``; ``lse`` / ``delta``
    ``[b, G, g, sq, 1]``) -> (dq ``[b, G, g, sq, d]``, dk / dv ``[b, G, 1, t, d]``), ``block``
    query rows at a time."""
    kt, vt = ops.swapaxes(k, -1, -2), ops.swapaxes(v, -1, -2)  # [b, G, 1, d, t]
    dqs, dk, dv = [], None, None
    sq = q.shape[3]
    for start in range(0, sq, block):
        stop = start + block if start + block < sq else sq
        qb, dob = _seq(q, start, stop), _seq(do, start, stop)
        scores = ops.matmul(qb * scale, kt)  # [b, G, g, c, t]
        if pos is not None:
            scores = scores + _bias_rows(pos, start, stop)
        probs = ops.exp(scores - _seq(lse, start, stop))
        dv_b = ops.matmul(ops.swapaxes(probs, -1, -2), dob).sum(axis=2, keepdims=True)
        ds = probs * (ops.matmul(dob, vt) - _seq(delta, start, stop))  # [b, G, g, c, t]
        dqs.append(ops.matmul(ds, k) * scale)  # [b, G, g, c, d]
        dk_b = ops.matmul(ops.swapaxes(ds, -1, -2), qb).sum(axis=2, keepdims=True) * scale
        dk, dv = (dk_b, dv_b) if dk is None else (dk + dk_b, dv + dv_b)
    return (dqs[0] if len(dqs) == 1 else ops.cat(dqs, 3)), dk, dv


def _seq(x, start, stop):
    """Tokens ``[start, stop)`` of a ``[b, G, g, s, d]`` tensor (plain slice: bprop-safe)."""
    return x[:, :, :, start:stop]


class _RingCore(nn.Cell):
    """Ring attention returning ``(out [b, n, s, d], lse [b, n_kv, g, s, 1])``; its ``bprop``
    is the ring backward (``lse`` is an output only so the backward can use it)."""

    def __init__(self, cp_group: ProcessGroup, scale: float, block_size: int):
        super().__init__()
        self.cp = cp_group
        self.scale = float(scale)
        self.block = int(block_size)

    def _grouped(self, q, k, v):
        b, n, s, d = q.shape
        n_kv = k.shape[1]
        qg = q.astype(ms.float32).reshape(b, n_kv, n // n_kv, s, d)  # -> [b, G, g, s, d]
        kg = k.astype(ms.float32).reshape(b, n_kv, 1, s, d)  # -> [b, G, 1, s, d]
        vg = v.astype(ms.float32).reshape(b, n_kv, 1, s, v.shape[-1])
        return qg, kg, vg

    def construct(self, q, k, v):
        p, r, scale = self.cp.size, self.cp.rank, self.scale
        s = q.shape[2]
        c = s // 2
        qg, kg, vg = self._grouped(q, k, v)
        out, lse = _attend(qg, kg, vg, scale, ops.arange(0, s, 1, dtype=ms.int32), self.block)
        kv = ops.cat((kg, vg), 2)  # [b, G, 2, s, d]: the block that travels
        for i in range(1, p):
            kv = ring_shift(kv, self.cp)
            kb, vb = kv[:, :, 0:1], kv[:, :, 1:2]
            if (r - i) % p < r:  # block's first chunk, seen by every local query
                o_i, l_i = _attend(qg, _seq(kb, 0, c), _seq(vb, 0, c), scale, None, self.block)
                out, lse = _merge(out, lse, o_i, l_i)
            else:  # whole block, seen by the local second chunk only
                o_i, l_i = _attend(_seq(qg, c, s), kb, vb, scale, None, self.block)
                o1, l1 = _merge(_seq(out, c, s), _seq(lse, c, s), o_i, l_i)
                out = ops.cat((_seq(out, 0, c), o1), 3)
                lse = ops.cat((_seq(lse, 0, c), l1), 3)
        return out.reshape(q.shape).astype(q.dtype), lse  # [b, G, g, s, d] -> [b, n, s, d]

    def bprop(self, q, k, v, outs, douts):
        p, r, scale = self.cp.size, self.cp.rank, self.scale
        s = q.shape[2]
        c = s // 2
        qg, kg, vg = self._grouped(q, k, v)
        lse = outs[1]
        do = douts[0].astype(ms.float32).reshape(qg.shape)
        delta = (do * outs[0].astype(ms.float32).reshape(qg.shape)).sum(axis=-1, keepdims=True)
        pos = _arange_bwd(0, s, 1, dtype=ms.int32)
        dq, dk, dv = _block_grads(qg, kg, vg, do, lse, delta, scale, pos, self.block)
        kv = ops.cat((kg, vg), 2)  # [b, G, 2, s, d]
        dkv = ops.cat((dk, dv), 2)  # gradient accumulator of the block held, travels with it
        for i in range(1, p):
            packet = _ring_shift_bwd(ops.cat((kv, dkv), 2), self.cp)  # [b, G, 4, s, d]
            kv, dkv = packet[:, :, 0:2], packet[:, :, 2:4]
            kb, vb = kv[:, :, 0:1], kv[:, :, 1:2]
            if (r - i) % p < r:
                dq_i, dk_i, dv_i = _block_grads(qg, _seq(kb, 0, c), _seq(vb, 0, c), do, lse,
                                                delta, scale, None, self.block)
                dq = dq + dq_i
                first = _seq(dkv, 0, c) + ops.cat((dk_i, dv_i), 2)
                dkv = ops.cat((first, _seq(dkv, c, s)), 3)
            else:
                dq_i, dk_i, dv_i = _block_grads(_seq(qg, c, s), kb, vb, _seq(do, c, s),
                                                _seq(lse, c, s), _seq(delta, c, s), scale, None,
                                                self.block)
                dq = ops.cat((_seq(dq, 0, c), _seq(dq, c, s) + dq_i), 3)
                dkv = dkv + ops.cat((dk_i, dv_i), 2)
        if p > 1:
            dkv = _ring_shift_bwd(dkv, self.cp)  # each accumulator back to its owner
        dk, dv = dkv[:, :, 0:1], dkv[:, :, 1:2]
        return (dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
                dv.reshape(v.shape).astype(v.dtype))


class RingAttention(nn.Cell):
    """Ring context-parallel causal attention (see the module docstring).

    ``cp_group``: the context-parallel ``ProcessGroup``; ``scale``: the softmax scale;
    ``block_size``: query rows per score block (at most one ``[b, n, block_size, s_local]``
    score block is alive at a time).
    ``construct(q, k, v)``: q ``[b, n, s_local, d]``, k / v ``[b, n_kv, s_local, d]``
    (``s_local`` even, ``n`` divisible by ``n_kv``) -> ``[b, n, s_local, d]``.
    """

    def __init__(self, cp_group: ProcessGroup, scale: float, block_size: int = 1024):
        super().__init__()
        self.core = _RingCore(cp_group, scale, block_size)

    def construct(self, q, k, v):
        if (self.core.cp.size > 1 and q.shape[2] % 2) or q.shape[1] % k.shape[1]:
            raise ValueError(f"ring_attention: local sequence {q.shape[2]} must be even (two "
                             f"chunks) and {q.shape[1]} heads a multiple of {k.shape[1]} kv heads")
        return self.core(q, k, v)[0]


def ring_attention(q, k, v, cp_group: ProcessGroup, scale: float, block_size: int = 1024):
    """Ring attention of the local tensors (builds a ``RingAttention``; PyNative use)."""
    return RingAttention(cp_group, scale, block_size)(q, k, v)
