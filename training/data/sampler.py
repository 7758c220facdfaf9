"""GPT-style samples over one token stream, and a deterministic, resumable, dp-split batch sampler.

Samples. The token stream (all documents back to back, each ended by EOD) is cut into
non-overlapping windows of ``seq_length`` tokens; sample ``i`` is
``stream[i*S : i*S + S + 1]``, i.e. the input ``[:-1]`` and the next-token labels ``[1:]``
(consecutive samples share one boundary token). ``split_samples`` keeps the first samples for
training and the tail of the stream for validation, so the two never share a window.

Order. Epoch ``e`` visits the training samples in the permutation drawn by
``numpy.random.RandomState([seed, e])`` (a legacy generator whose stream NumPy keeps stable
across versions); the last incomplete global batch of an epoch is dropped. Global batch ``b``
is the next ``global_batch_size`` indices of that order; dp rank ``r`` takes the ``r``-th
contiguous slice of ``global_batch_size / dp`` of them and cuts it into ``grad_accum_steps``
micro-batches. So all dp ranks read disjoint parts of the same global batch, and together they
read exactly what one rank reads with dp = 1.

Resume. The whole position is one number, ``consumed_samples`` (global), as in Megatron:
``state_dict()`` saves it with the parameters it depends on, ``load_state_dict()`` restores it
and refuses a state from a different dataset or seed.
"""
from __future__ import annotations

import numpy as np

from training.errors import DataError


class GPTSampleDataset:
    """Fixed-length next-token samples over a flat token array (e.g. ``MMapIndexedDataset.tokens``)."""

    def __init__(self, tokens: np.ndarray, seq_length: int, first_sample: int = 0,
                 num_samples: int | None = None):
        self.tokens, self.seq_length = tokens, int(seq_length)
        total = max((len(tokens) - 1) // self.seq_length, 0)
        self.first = int(first_sample)
        self.num_samples = total - self.first if num_samples is None else int(num_samples)
        if self.first < 0 or self.num_samples < 0 or self.first + self.num_samples > total:
            raise ValueError(f"samples [{self.first}, {self.first + self.num_samples}) exceed the "
                             f"{total} windows of {self.seq_length} tokens in the stream")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """``seq_length + 1`` tokens (int32) of sample ``i``."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start = (self.first + int(i)) * self.seq_length
        return np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int32)

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)``, both int32 ``[len(indices), seq_length]``."""
        rows = np.stack([self[int(i)] for i in indices])
        return rows[:, :-1], rows[:, 1:]


def split_samples(tokens: np.ndarray, seq_length: int, valid_fraction: float
                  ) -> tuple[GPTSampleDataset, GPTSampleDataset]:
    """Train on the head of the stream, validate on its last ``valid_fraction`` of windows."""
    total = max((len(tokens) - 1) // seq_length, 0)
    n_valid = int(round(total * valid_fraction))
    if valid_fraction > 0:
        n_valid = max(n_valid, 1)
    n_train = total - n_valid
    if n_train < 1:
        raise DataError(f"the token stream ({len(tokens)} tokens) is too short for "
                        f"model.seq_length={seq_length} and data.valid_fraction={valid_fraction}")
    return (GPTSampleDataset(tokens, seq_length, 0, n_train),
            GPTSampleDataset(tokens, seq_length, n_train, n_valid))


class GPTBatchSampler:
    """Yields, per optimizer step, this dp rank's micro-batches of sample indices.

    ``next_step()`` -> list of ``grad_accum_steps`` int64 arrays of ``micro_batch_size`` indices.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 1234, shuffle: bool = True,
                 consumed_samples: int = 0):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                             f"micro_batch_size*dp = {micro_batch_size}*{dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if num_samples < global_batch_size:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {global_batch_size}")
        self.num_samples, self.micro = num_samples, micro_batch_size
        self.global_batch = global_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.grad_accum_steps = global_batch_size // (micro_batch_size * dp_size)
        self.batches_per_epoch = num_samples // global_batch_size
        self.consumed_samples = int(consumed_samples)
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                rng = np.random.RandomState([self.seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF])
                self._order = rng.permutation(self.num_samples).astype(np.int64)
            else:
                self._order = np.arange(self.num_samples, dtype=np.int64)
            self._epoch = epoch
        return self._order

    @property
    def epoch(self) -> int:
        return self.consumed_samples // (self.batches_per_epoch * self.global_batch)

    def global_batch_indices(self, step_offset: int = 0) -> np.ndarray:
        """All ``global_batch_size`` indices of the next (or ``step_offset``-th next) global batch."""
        batch = self.consumed_samples // self.global_batch + step_offset
        epoch, within = divmod(batch, self.batches_per_epoch)
        start = within * self.global_batch
        return self._epoch_order(epoch)[start:start + self.global_batch]

    def next_step(self) -> list[np.ndarray]:
        """This rank's micro-batches for the next optimizer step; advances the position."""
        if self.consumed_samples % self.global_batch:
            raise ValueError(f"consumed_samples {self.consumed_samples} is not a multiple of the "
                             f"global batch {self.global_batch}")
        per_rank = self.global_batch // self.dp_size
        mine = self.global_batch_indices()[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        self.consumed_samples += self.global_batch
        return [mine[k * self.micro:(k + 1) * self.micro] for k in range(self.grad_accum_steps)]

    def __iter__(self):
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        """JSON-serialisable position (store it in the checkpoint's meta)."""
        return {"consumed_samples": self.consumed_samples, "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state.get(key)!r}, "
                                 f"this run has {key}={getattr(self, key)!r}")
        self.consumed_samples = int(state["consumed_samples"])


class EvalBatches:
    """Validation micro-batches in fixed order, the same on every call (wraps around)."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1):
        if num_samples < micro_batch_size * dp_size:
            raise DataError(f"{num_samples} validation samples cannot fill one micro-batch per dp "
                            f"rank (training.micro_batch_size={micro_batch_size} x dp {dp_size}): "
                            "raise data.valid_fraction or use more text")
        self.num_samples, self.micro = num_samples, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def batches(self, num_batches: int) -> list[np.ndarray]:
        """``num_batches`` micro-batches for this rank; all ranks together cover distinct samples."""
        out, stride = [], self.micro * self.dp_size
        for b in range(num_batches):
            start = b * stride + self.dp_rank * self.micro
            out.append(np.arange(start, start + self.micro, dtype=np.int64) % self.num_samples)
        return out
