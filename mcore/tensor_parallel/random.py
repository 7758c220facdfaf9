"""Model-parallel randomness: named seed streams and tp-size-independent initialisation.

**Initialisation.** A parallel layer builds its FULL master weight from one seed with numpy's
portable ``Generator`` and keeps its shard (``init_shard``), so a model with tp=2 has exactly the
weights of the same model with tp=1 at step 0 (Megatron's ``_initialize_affine_weight_cpu``).
Every tp rank draws the same master weight: memory for one full weight per rank during init.

**Dropout and other random ops.** Megatron forks named CUDA RNG states. MindSpore 2.10 on CPU
has no generator-aware random kernel (``mint`` random ops have no CPU kernel; ``ops.dropout``
and ``ops.rand`` ignore ``set_rng_state``), but a seeded primitive (``ops.Dropout(Seed0,
Seed1)``) gives the same mask sequence in every process, in PyNative and jit. So a named state
here is a seed, and each random op built under a name gets its own stream derived from it:

- ``"default"``: ``seed`` -- the same on every tp rank (dropout on replicated activations,
  e.g. after a RowParallelLinear without sequence parallelism, must agree across tp).
- ``"model-parallel-rng"``: ``seed + 2718 + tp_rank`` -- differs across tp ranks (dropout on
  split activations, e.g. attention probabilities of a head shard, or sequence-parallel
  regions).
- ``"expert-parallel-rng"``: ``seed + 1024 + 100 * ep_rank + tp_rank``.

Both contracts are tested on real ranks in ``tests/mcore/test_tensor_parallel.py``.
"""
from __future__ import annotations

import zlib

import numpy as np
from mindspore import nn, ops

from mcore.tensor_parallel.sharding import shard

DEFAULT = "default"
MODEL_PARALLEL = "model-parallel-rng"
EXPERT_PARALLEL = "expert-parallel-rng"


def name_seed(name: str) -> int:
    """A stable seed from a name (the same in every process and Python run)."""
    return zlib.crc32(name.encode())


def init_normal(std: float = 0.02):
    """``init_method``: N(0, std^2) in float32. An init method is ``fn(rng, shape) -> ndarray``."""

    def init(rng: np.random.Generator, shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    return init


def init_master(shape, seed: int, init_method=None) -> np.ndarray:
    """The full master weight ``shape`` drawn from ``seed`` (identical for every tp size)."""
    init_method = init_method or init_normal()
    out = np.asarray(init_method(np.random.default_rng(seed), tuple(shape)), dtype=np.float32)
    if out.shape != tuple(shape):
        raise ValueError(f"init_method returned shape {out.shape}, expected {tuple(shape)}")
    return out


def init_shard(shape, seed: int, tp_size: int, tp_rank: int, dim: int,
               init_method=None, partitions=None) -> np.ndarray:
    """This tp rank's shard (along ``dim``) of the master weight of full ``shape``.

    ``partitions``: sizes along ``dim`` of the independently split parts of a fused weight
    (e.g. ``(q, k, v)`` rows): each part is split across tp on its own and the rank's pieces
    are concatenated, ``[q_r; k_r; v_r]``, so the master weight (in ``[q; k; v]`` layout) is the
    same for every tp size.
    """
    master = init_master(shape, seed, init_method)
    if not partitions:
        return shard(master, tp_size, tp_rank, dim)
    if sum(partitions) != shape[dim]:
        raise ValueError(f"partitions {tuple(partitions)} do not add up to dimension {dim} "
                         f"of shape {tuple(shape)}")
    parts = np.split(master, np.cumsum(partitions)[:-1], axis=dim)
    return np.concatenate([shard(p, tp_size, tp_rank, dim) for p in parts], axis=dim)


class RNGStatesTracker:
    """Named seed streams of one rank (no global state: build one, pass it to model builders).

    ``seed(name)`` is the base seed of a stream; ``next_seed(name)`` hands out a fresh seed for
    each random op built under that name, in build order, so that ops built in the same order
    on different ranks draw identical (same base seed) or independent (different base seed)
    streams. ``dropout(p, name)`` builds a seeded dropout Cell.
    """

    def __init__(self):
        self._seeds: dict[str, int] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._seeds:
            raise ValueError(f"RNGStatesTracker: state {name!r} already exists")
        if seed in self._seeds.values():
            raise ValueError(f"RNGStatesTracker: seed {seed} is already used by another state")
        self._seeds[name] = int(seed)
        self._counts[name] = 0

    def names(self) -> list[str]:
        return list(self._seeds)

    def seed(self, name: str = DEFAULT) -> int:
        if name not in self._seeds:
            raise KeyError(f"RNGStatesTracker: no state {name!r} (have {self.names()})")
        return self._seeds[name]

    def next_seed(self, name: str = DEFAULT) -> int:
        """A new seed for the next random op of stream ``name`` (31-bit, deterministic)."""
        base = self.seed(name)
        self._counts[name] += 1
        return int(np.random.default_rng([base, self._counts[name]]).integers(1, 2**31 - 1))

    def dropout(self, p: float, name: str = DEFAULT) -> "Dropout":
        return Dropout(p, self.next_seed(name))


def model_parallel_seed(seed: int, tp_rank: int = 0, ep_rank: int = 0) -> RNGStatesTracker:
    """A tracker with Megatron's seed offsets (see the module docstring)."""
    tracker = RNGStatesTracker()
    tracker.add(DEFAULT, seed)
    tracker.add(MODEL_PARALLEL, seed + 2718 + tp_rank)
    tracker.add(EXPERT_PARALLEL, seed + 1024 + 100 * ep_rank + tp_rank)
    return tracker


class Dropout(nn.Cell):
    """Inverted dropout with a fixed seed: zero with probability ``p``, scale the rest by
    1/(1-p). Identity when ``p == 0`` or the Cell is in eval mode (``set_train(False)``).
    The mask sequence depends only on the seed and the call count (same in PyNative and jit).
    Note: a recomputed block draws a new mask, so do not recompute blocks with dropout > 0."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.op = ops.Dropout(keep_prob=1.0 - self.p, Seed0=seed % 2**31,
                              Seed1=(seed * 7 + 1) % 2**31)
        self.set_train(True)

    def construct(self, x):
        if self.p == 0.0 or not self.training:
            return x
        out, _ = self.op(x)
        return out
