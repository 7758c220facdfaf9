"""Core attention (softmax(q k^T * scale + mask) v) behind one dispatch.

``CoreAttention`` picks, once when it is built, between

- the device's fused flash-attention kernel (``ops.flash_attention_score``, Ascend only), used
  for causal prefill without a padding mask (``s == t``); and
- on CPU, the C++ kernel of the ``mcore.fusions`` registry (op "attention") for float32 causal
  attention without ``key_mask``, ``q_offset`` or ALiBi (training and prefill; the kernel holds
  one tile of query rows x 64 keys of scores at a time, never ``[s, t]``); and
- ``one_token_attention`` for ONE query per row at a ``q_offset`` (the compiled decode step over
  a static or slot cache; causal, no ALiBi): ``blocked_attention``'s result in a few ops; and
- ``blocked_attention``, a composed implementation that runs everywhere. It handles grouped
  key/value heads without copying them (queries are viewed as ``[b, g_kv, heads_per_group, s, d]``)
  and walks the queries in blocks of ``block_size`` rows, so at most one
  ``[b, g_kv, heads_per_group, block_size, t]`` score block is alive at a time.

Masks: causal with the queries aligned to the END of the keys (query ``i`` of ``s`` sees keys
``j <= i + t - s``; this is what a KV cache needs) or at ``q_offset`` (a static cache: keys
past the written positions are hidden by the same rule), plus an optional ``key_mask [b, t]``
(int): 0 = padding, any positive value = the id of the segment (packed sample) the key belongs
to. A query sees a key only when the key is not padding and, if the query's own position holds
a segment id (its ``key_mask`` value > 0), the key carries the same id: samples packed into one
row never attend across their boundary (``training/data/sft.py``). A 1/0 mask is one segment:
the plain padding mask of generation (a padding query still sees every real key before it).

ALiBi: with ``alibi_slopes`` (one float per LOCAL query head) the composed path adds
``slope_head * (key_pos - query_pos)`` to the scaled scores before the mask (the fused kernel
is not used then).

Additive bias: ``construct(..., bias=)`` takes a float Tensor ``[b or 1, n or 1, s or 1, t]``
(``n`` = this rank's query heads) added to the scaled scores before the mask, e.g. T5's
relative position bias (``mcore.transformer.relative_position``); always the composed path.

Cross-attention (``causal=False`` with ``s != t``: queries and keys are different sequences):
``key_mask`` only hides padding keys (``<= 0``); segment ids are not compared.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from mcore.fusions.registry import choice, fused_cell

_NEG = -1.0e30


def _bias_blocks(bias, b, n_kv, g, s):
    """``bias [B, N, S, t]`` (B in {1, b}, N in {1, n_kv g}, S in {1, s}) as
    ``[B, n_kv or 1, g or 1, S, t]``, the head layout of the grouped scores."""
    big_b, heads, rows, t = bias.shape
    if big_b not in (1, b) or heads not in (1, n_kv * g) or rows not in (1, s):
        raise ValueError(f"attention bias of shape {tuple(bias.shape)} does not broadcast to "
                         f"[{b}, {n_kv * g}, {s}, t]")
    if heads == 1:
        return bias.reshape(big_b, 1, 1, rows, t)  # [B, 1, S, t] -> [B, 1, 1, S, t]
    return bias.reshape(big_b, n_kv, g, rows, t)  # [B, n, S, t] -> [B, n_kv, g, S, t]


def blocked_attention(q, k, v, scale: float, key_mask=None, block_size: int = 1024,
                      q_offset=None, alibi=None, causal: bool = True, bias=None):
    """q ``[b, n, s, d]``, k / v ``[b, n_kv, t, d]`` (n divisible by n_kv) -> ``[b, n, s, d]``.

    ``causal=False``: every query sees every key (bidirectional encoders, cross-attention);
    ``key_mask`` then only hides padding and other segments (only padding when ``s != t``:
    cross-attention), and ``q_offset`` is ignored. ``bias``: None or an additive float bias
    ``[b or 1, n or 1, s or 1, t]`` on the scaled scores.

    ``q_offset``: position of query 0 among the keys (int or int32 scalar Tensor); None =
    ``t - s`` (queries are the last s keys). ``alibi``: None or the ALiBi slopes of the ``n``
    heads as a float32 Tensor ``[1, n_kv, g, 1, 1]``.
    """
    b, n, s, d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    g = n // n_kv
    qg = q.reshape(b, n_kv, g, s, d)  # [b, n, s, d] -> [b, n_kv, g, s, d]
    kt = ops.swapaxes(k, -1, -2).reshape(b, n_kv, 1, d, t)  # [b, n_kv, t, d] -> [b, n_kv, 1, d, t]
    vg = v.reshape(b, n_kv, 1, t, v.shape[-1])  # [b, n_kv, t, dv] -> [b, n_kv, 1, t, dv]
    keep_keys = seg_k = None
    if key_mask is not None:
        seg_k = key_mask.astype(ms.int32).reshape(b, 1, 1, 1, t)  # [b, t] -> [b, 1, 1, 1, t]
        keep_keys = seg_k > 0
    k_pos = ops.arange(0, t, 1, dtype=ms.int32).reshape(1, t)  # [1, t]
    segments = causal or s == t  # cross-attention: query positions are not key positions
    if bias is not None:
        bias = _bias_blocks(bias.astype(ms.float32), b, n_kv, g, s)  # [B, n_kv|1, g|1, S, t]
    outs = []
    for start in range(0, s, block_size):
        stop = min(start + block_size, s)
        q_blk = qg if stop - start == s else qg[:, :, :, start:stop, :]  # [b, n_kv, g, c, d]
        scores = ops.matmul(q_blk.astype(ms.float32), kt.astype(ms.float32))  # [b, n_kv, g, c, t]
        scores = scores * scale
        q_pos = ops.arange(start, stop, 1, dtype=ms.int32).reshape(stop - start, 1)
        q_pos = q_pos + (t - s if q_offset is None else q_offset)  # [c, 1] absolute positions
        # [c, t]; bidirectional: every key, as a broadcastable all-true mask
        keep = k_pos <= q_pos if causal else ops.ones((1, t), ms.bool_)
        if alibi is not None:
            distance = (k_pos - q_pos).astype(ms.float32)  # [c, t], <= 0 where kept
            scores = scores + alibi * distance  # [1, n_kv, g, 1, 1] * [c, t]
        if bias is not None:
            rows = bias if bias.shape[3] == 1 or stop - start == s else bias[:, :, :, start:stop]
            scores = scores + rows  # + [B, n_kv|1, g|1, c|1, t]
        if keep_keys is not None and not segments:
            keep = ops.logical_and(keep, keep_keys)  # [b, 1, 1, 1, t]: padding only
        elif keep_keys is not None:
            # the query's own segment id: key_mask at its absolute position
            seg_q = ops.gather(seg_k.reshape(b, t), q_pos.reshape(-1), 1)  # [b, t] -> [b, c]
            seg_q = seg_q.reshape(b, 1, 1, stop - start, 1)  # [b, c] -> [b, 1, 1, c, 1]
            same = ops.logical_or(ops.equal(seg_k, seg_q), seg_q <= 0)  # [b, 1, 1, c, t]
            keep = ops.logical_and(ops.logical_and(keep, keep_keys), same)  # [b, 1, 1, c, t]
        scores = ops.masked_fill(scores, ops.logical_not(keep), _NEG)
        probs = ops.softmax(scores, -1).astype(v.dtype)
        outs.append(ops.matmul(probs, vg))  # [b, n_kv, g, c, t] @ [b, n_kv, 1, t, dv]
    out = outs[0] if len(outs) == 1 else ops.cat(outs, 3)  # [b, n_kv, g, s, dv]
    return out.reshape(b, n, s, out.shape[-1])  # [b, n_kv, g, s, dv] -> [b, n, s, dv]


def one_token_attention(q, k, v, scale: float, key_mask=None, q_offset=None):
    """``blocked_attention`` (causal, no ALiBi) for ONE query per row, in a few ops: the decode
    step over a cache. q ``[b, n, 1, d]``, k / v ``[b, n_kv, t, d]`` -> ``[b, n, 1, dv]``.

    The ``g = n / n_kv`` query heads of a key group are the rows of one product with the
    group's keys (``[b, n_kv, g, d] @ [b, n_kv, t, d]^T``: no transposed or repeated copy of
    the cache); the mask (key ``j`` kept when ``j <= q_offset``, the key is not padding and, when
    the query's own ``key_mask`` value is a segment id > 0, the key carries the same id) is one
    ``select``."""
    b, n, _, d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    qg = q.reshape(b, n_kv, n // n_kv, d)  # [b, n, 1, d] -> [b, n_kv, g, d]
    scores = ops.BatchMatMul(transpose_b=True)(qg.astype(ms.float32), k.astype(ms.float32))
    scores = scores * scale  # [b, n_kv, g, t]
    q_pos = t - 1 if q_offset is None else q_offset  # the query's absolute position
    keep = ops.arange(0, t, 1, dtype=ms.int32) <= q_pos  # [t]
    if key_mask is not None:
        seg_k = key_mask.astype(ms.int32)  # [b, t]
        at = Tensor([q_pos], ms.int32) if isinstance(q_pos, int) else q_pos.reshape(1)  # [1]
        seg_q = ops.gather(seg_k, at, 1)  # [b, 1]: the query's own segment id
        same = ops.logical_or(ops.equal(seg_k, seg_q), seg_q <= 0)  # [b, t]
        keep = ops.logical_and(ops.logical_and(keep, seg_k > 0), same)  # [b, t]
        keep = keep.reshape(b, 1, 1, t)  # [b, t] -> [b, 1, 1, t]
    scores = ops.select(keep, scores, _NEG)
    probs = ops.softmax(scores, -1).astype(v.dtype)
    out = ops.matmul(probs, v)  # [b, n_kv, g, t] @ [b, n_kv, t, dv] -> [b, n_kv, g, dv]
    return out.reshape(b, n, 1, out.shape[-1])  # [b, n_kv, g, dv] -> [b, n, 1, dv]


def fused_available() -> bool:
    """True when the registry picks the device's fused flash-attention kernel (Ascend, unless
    ``MSFORMERS_FUSIONS=composed``)."""
    return choice("attention") == "device"


class CoreAttention(nn.Cell):
    """Dispatching core attention; see the module docstring for the contract.

    ``use_fused``: None = decide from the device now (Ascend: flash attention; CPU: the C++
    kernel, see the module docstring); False = always ``blocked_attention``.
    ``alibi_slopes``: None, or the ALiBi slopes of this rank's ``num_heads`` heads
    (``mcore.transformer.positions.alibi_slopes_for_rank``); ``num_kv_heads`` (needed with
    them) groups the heads as the composed path does.
    ``causal=False``: bidirectional attention (always the composed path); see
    ``blocked_attention``.
    """

    def __init__(self, num_heads: int, scale: float, block_size: int = 1024,
                 use_fused: bool | None = None, alibi_slopes=None, num_kv_heads: int = 1,
                 causal: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.causal = bool(causal)
        if not self.causal:
            use_fused = False
        self.scale = float(scale)
        self.block_size = int(block_size)
        self.alibi = None
        if alibi_slopes is not None:
            if len(alibi_slopes) != num_heads or num_heads % num_kv_heads:
                raise ValueError(f"CoreAttention: {len(alibi_slopes)} alibi slopes for "
                                 f"{num_heads} heads in {num_kv_heads} kv groups")
            # [n] -> [1, n_kv, g, 1, 1], the head layout of blocked_attention's scores
            self.alibi = Tensor(alibi_slopes, ms.float32).reshape(
                1, num_kv_heads, num_heads // num_kv_heads, 1, 1)
            use_fused = False
        self.use_fused = fused_available() if use_fused is None else bool(use_fused)
        kernel = None
        if choice("attention") == "cpu_kernel" and self.alibi is None and use_fused is not False:
            kernel = fused_cell("attention", scale=self.scale)
        self.use_kernel = kernel is not None
        if self.use_kernel:
            self.kernel = kernel
        if self.use_fused:
            # sparse_mode 3 (right-down causal) takes a compressed [2048, 2048] upper mask.
            causal = ops.triu(ops.ones((2048, 2048), ms.uint8), 1)
            self.fused_mask = Tensor(causal.asnumpy())

    def construct(self, q, k, v, key_mask=None, q_offset=None, bias=None):
        if bias is not None:  # an additive bias: only the composed path takes one
            return blocked_attention(q, k, v, self.scale, key_mask, self.block_size, q_offset,
                                     self.alibi, self.causal, bias)
        if self.use_fused and key_mask is None and q_offset is None and q.shape[2] == k.shape[2]:
            return ops.flash_attention_score(q, k, v, self.num_heads, attn_mask=self.fused_mask,
                                             scalar_value=self.scale, input_layout="BNSD",
                                             sparse_mode=3)
        if (self.use_kernel and key_mask is None and q_offset is None and q.dtype == ms.float32
                and q.shape[2] <= k.shape[2] and v.shape[3] == q.shape[3]):
            return self.kernel(q, k, v)
        if q.shape[2] == 1 and q_offset is not None and self.causal and self.alibi is None:
            return one_token_attention(q, k, v, self.scale, key_mask, q_offset)
        return blocked_attention(q, k, v, self.scale, key_mask, self.block_size, q_offset,
                                 self.alibi, self.causal)
