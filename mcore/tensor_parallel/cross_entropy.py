"""Cross-entropy over logits split on the vocabulary, without gathering the full vocabulary.

Rank ``r`` of the tp group (size ``P``) holds ``logits`` [b, s, V/P] for vocabulary entries
``[r * V/P, (r + 1) * V/P)``. Per token, with ``z`` the full logits row, ``y`` the label and
``eps`` the label smoothing:

    lse  = log sum_v exp(z_v)                      (max-shifted: stable for |z| ~ 1e4)
    loss = lse - (1 - eps) * z_y - eps * mean_v z_v
         = -(1 - eps) log p_y - eps * mean_v log p_v          (p = softmax(z))
    dloss/dz_v = p_v - (1 - eps) [v == y] - eps / V

and ``loss = 0`` (no gradient) where ``y == ignore_index``. Each rank reduces its shard to five
numbers per token (local max, sum of exp shifted by it, the shifted label logit and a 0/1
flag if it owns the label, sum of logits shifted by the local max); one all-gather of those
[P, b, s, 5] combines them.
The backward pass recomputes ``p_v`` on the local shard from the saved log-sum-exp: no
communication.

``TokenCrossEntropy`` is the Cell the models call: at tp=1 without label smoothing it uses the
``cross_entropy`` op of ``mcore.fusions`` (on CPU a C++ kernel by default, chosen when the Cell
is built), which keeps no vocabulary-sized tensor but the logits and their gradient; otherwise
(tp > 1, label smoothing, ``MSFORMERS_FUSIONS=composed``, ``fused=False``) the composed
``VocabParallelCrossEntropy`` above.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from mcore.comm.collectives import all_gather
from mcore.fusions.registry import fused_cell
from mcore.parallel_state import ProcessGroup


class VocabParallelCrossEntropy(nn.Cell):
    """(logits [b, s, V/P] float, labels [b, s] int) -> (loss [b, s], lse [b, s]).

    Labels must be in ``[0, V)`` or equal ``ignore_index``.

    ``lse`` (the full-vocabulary log-sum-exp) is returned for the backward pass and for
    diagnostics; use ``vocab_parallel_cross_entropy`` for the loss alone.
    """

    def __init__(self, group: ProcessGroup, ignore_index: int = -100, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing must be in [0, 1), "
                             f"got {label_smoothing}")
        self.group, self.ignore_index, self.eps = group, ignore_index, float(label_smoothing)
        # A primitive, not ops.arange: a Python function with an `if` called in both construct
        # and bprop breaks jit compilation. OneHot writes zeros for out-of-range indices.
        self.one_hot = ops.OneHot(axis=-1)
        self.on, self.off = ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)

    def _local_terms(self, logits, labels):
        """Shard-local masks: (label one-hot on this shard [b, s, V/P], valid [b, s])."""
        n = logits.shape[-1]
        local = labels - self.group.rank * n  # [b, s]
        onehot = self.one_hot(local, n, self.on, self.off).astype(logits.dtype)  # [b, s, V/P]
        valid = ops.not_equal(labels, self.ignore_index).astype(logits.dtype)  # [b, s]
        return onehot, valid

    def construct(self, logits, labels):
        n = logits.shape[-1]
        onehot, valid = self._local_terms(logits, labels)
        m = ops.stop_gradient(logits.max(axis=-1, keepdims=True))  # [b, s, 1] local max
        shifted = logits - m
        stats = ops.concat([m,
                            ops.exp(shifted).sum(axis=-1, keepdims=True),
                            (shifted * onehot).sum(axis=-1, keepdims=True),
                            shifted.sum(axis=-1, keepdims=True),
                            onehot.sum(axis=-1, keepdims=True)], axis=-1)  # [b, s, 5]
        stats = all_gather(ops.expand_dims(stats, 0), self.group, 0)  # [P, b, s, 5]
        m_r, sum_r, zy_r, zsum_r = stats[..., 0], stats[..., 1], stats[..., 2], stats[..., 3]
        owns = stats[..., 4]  # [P, b, s]: 1 on the rank whose shard holds the label
        m_all = m_r.max(axis=0)  # [b, s] global max
        lse_shift = ops.log((sum_r * ops.exp(m_r - m_all)).sum(axis=0))  # log sum exp(z - max)
        zy = (owns * (zy_r + m_r - m_all)).sum(axis=0)  # z_y - max
        loss = lse_shift - zy
        if self.eps > 0.0:
            zmean = (zsum_r + n * (m_r - m_all)).sum(axis=0) / (n * self.group.size)
            loss = lse_shift - (1.0 - self.eps) * zy - self.eps * zmean
        return loss * valid, lse_shift + m_all

    def bprop(self, logits, labels, out, dout):
        n = logits.shape[-1]
        onehot, valid = self._local_terms(logits, labels)
        lse = out[1]
        probs = ops.exp(logits - ops.expand_dims(lse, -1))  # [b, s, V/P] softmax shard
        target = onehot * (1.0 - self.eps) + self.eps / (n * self.group.size)
        dloss = ops.expand_dims(dout[0] * valid, -1)  # [b, s, 1]
        dlse = ops.expand_dims(dout[1], -1)  # d lse / d z_v = p_v (e.g. for a z-loss on lse)
        return (probs - target) * dloss + probs * dlse, ops.zeros(labels.shape, labels.dtype)


class TokenCrossEntropy(nn.Cell):
    """(logits [b, s, V/P] float, labels [b, s] int) -> per-token loss [b, s] (0 where
    ``labels == ignore_index``): ``vocab_parallel_cross_entropy`` with the fused op chosen once,
    at build time (module docstring). ``fused``: None = the registry's choice, False = composed,
    True = error when no fused op applies. The fused loss is float32 for any logits dtype."""

    def __init__(self, group: ProcessGroup, ignore_index: int = -100, label_smoothing: float = 0.0,
                 fused: bool | None = None):
        super().__init__()
        self.composed = VocabParallelCrossEntropy(group, ignore_index, label_smoothing)
        local = group.size == 1 and label_smoothing == 0.0
        if fused and not local:
            raise ValueError("TokenCrossEntropy(fused=True): the fused op covers tp=1 without "
                             f"label smoothing (tp={group.size}, "
                             f"label_smoothing={label_smoothing})")
        self.fused = None
        if local:
            self.fused = fused_cell("cross_entropy", fused, ignore_index=ignore_index)

    def construct(self, logits, labels):
        if self.fused is not None:
            return self.fused(logits, labels)
        return self.composed(logits, labels)[0]


def vocab_parallel_cross_entropy(logits, labels, tp_group: ProcessGroup, ignore_index: int = -100,
                                 label_smoothing: float = 0.0):
    """Per-token loss [b, s] (0 where ``labels == ignore_index``) from vocab-split logits
    [b, s, V/P]; see the module docstring for the math. Works in PyNative and jit."""
    loss, _ = VocabParallelCrossEntropy(tp_group, ignore_index, label_smoothing)(logits, labels)
    return loss


def masked_mean(loss, labels=None, ignore_index: int = -100, loss_mask=None):
    """Mean of ``loss`` [b, s] over the tokens that count: labels != ``ignore_index`` and, if
    given, ``loss_mask`` != 0. Returns 0 when no token counts."""
    mask = ops.ones(loss.shape, loss.dtype)
    if labels is not None:
        mask = mask * ops.not_equal(labels, ignore_index).astype(loss.dtype)
    if loss_mask is not None:
        mask = mask * loss_mask.astype(loss.dtype)
    return (loss * mask).sum() / ops.maximum(mask.sum(), ms.Tensor(1.0, loss.dtype))
