"""The loss of packed fine-tuning batches: a mean over the kept tokens of the whole batch.

A packed micro-batch (``training/data/sft.py``) is ``(inputs, labels, position_ids,
segment_ids)``, int32 ``[b, s]``, with ``labels = -100`` on the tokens that do not count. Its
``LossCell`` value is ``sum of token losses / denom`` (``training.step.LossCell``). For one
optimizer step of ``n`` micro-batches on each of ``D`` dp ranks, ``TrainStep`` averages the
micro-batch losses over ``n`` and ``D``; with ``denom = N / (n D)``, ``N`` the kept tokens of
the whole global batch (``packed_denominator``: counted on the host, summed over dp), that
average is ``sum of all kept token losses / N`` and its gradient the gradient of that mean:
independent of how the global batch is split into micro-batches and ranks.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np

from mcore.comm.collectives import all_reduce

IGNORE = -100


def kept_tokens(batches) -> int:
    """Tokens whose label is not -100 in ``batches`` ((inputs, labels, ...) numpy tuples)."""
    return int(sum(int((b[1] != IGNORE).sum()) for b in batches))


def dp_sum(values, dp_group) -> np.ndarray:
    """``values`` (float list) summed over the dp group (eager all-reduce; every rank calls)."""
    arr = np.asarray(values, np.float32)
    if dp_group.size > 1:
        arr = all_reduce(ms.Tensor(arr), dp_group).asnumpy()
    return arr


def packed_denominator(micro_batches, dp_group) -> ms.Tensor:
    """``N / (n D)`` (fp32 scalar) for this rank's ``n`` micro-batches of one step (see the
    module docstring; every dp rank calls)."""
    count = float(dp_sum([kept_tokens(micro_batches)], dp_group)[0])
    return ms.Tensor(max(count, 1.0) / (len(micro_batches) * dp_group.size), ms.float32)


def packed_mean_loss(loss_cell, batches, dp_group) -> float:
    """Forward only: the mean token loss over the kept tokens of ``batches`` on every dp rank
    (``loss_cell``: a ``training.step.LossCell``; every dp rank calls)."""
    one = ms.Tensor(1.0, ms.float32)
    total = sum(float(loss_cell(*[ms.Tensor(x, ms.int32) for x in b], one).asnumpy())
                for b in batches)
    total, count = dp_sum([total, kept_tokens(batches)], dp_group)
    return float(total / max(count, 1.0))
