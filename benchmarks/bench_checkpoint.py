"""Checkpoint save and load throughput (MB/s) beside the disk's plain write / read speed.

The payload: 84 MB of float32 tensors shaped like a transformer's (fused q/k/v and gate/up
columns, row-parallel weights, norms), saved as TWO tensor-parallel ranks would
(``mcore.checkpoint.save_checkpoint`` per rank: shards, hashes, manifests, ``meta.json``,
atomic rename) and loaded back by ONE process (``load_tensors``: every tensor resharded from
the two shards). The reference, measured in the same run on the same directory: the same
bytes written with ``numpy.ndarray.tofile`` + fsync, and read back with ``numpy.fromfile``.
Each row prints its MB/s and its ratio to the reference::

    .venv/bin/python -m pytest benchmarks/bench_checkpoint.py --benchmark-enable -s
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from mcore.checkpoint import Shard, ShardSpec, load_tensors, save_checkpoint, shard_spec

HIDDEN, LAYERS, TP = 512, 8, 2  # 8 x (qkv 3h x h + fc1 2f x h + fc2 h x f + o h x h), f = 2h


def _model():
    """name -> (global array, split dim, fused parts along it)."""
    rng = np.random.default_rng(0)
    h, f = HIDDEN, 2 * HIDDEN
    out = {}
    for i in range(LAYERS):
        out[f"layers.{i}.qkv.weight"] = (rng.standard_normal((3 * h, h), np.float32), 0, [h, h, h])
        out[f"layers.{i}.fc1.weight"] = (rng.standard_normal((2 * f, h), np.float32), 0, [f, f])
        out[f"layers.{i}.fc2.weight"] = (rng.standard_normal((h, f), np.float32), 1, None)
        out[f"layers.{i}.proj.weight"] = (rng.standard_normal((h, h), np.float32), 1, None)
        out[f"layers.{i}.norm.weight"] = (np.ones(h, np.float32), None, None)
    return out


def _local(full, spec):
    out = np.zeros(spec.local_shape, full.dtype)
    for b in spec.blocks:
        out[tuple(slice(s, s + n) for s, n in zip(b.local_start, b.shape))] = \
            full[tuple(slice(s, s + n) for s, n in zip(b.global_start, b.shape))]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = _model()
    ranks = []
    for r in range(TP):
        state = {}
        for name, (full, dim, parts) in model.items():
            if dim is None:
                if r == 0:
                    state[name] = full
                continue
            local = list(full.shape)
            local[dim] //= TP
            spec = shard_spec(tuple(local), dim, TP, r, parts)
            state[name] = Shard(_local(full, spec), spec)
        ranks.append(state)
    nbytes = sum(full.nbytes for full, _, _ in model.values())
    return tmp_path_factory.mktemp("bench_ckpt"), model, ranks, nbytes, {}


def _report(benchmark, name, nbytes, ref, kind):
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
        return
    seconds = benchmark.stats.stats.median
    ref.setdefault(kind, seconds)
    mb_s = nbytes / seconds / 1e6
    benchmark.extra_info.update(mb_per_s=round(mb_s, 1), vs_plain=round(ref[kind] / seconds, 2))
    print(f"\n{name:>18}: {mb_s:8.1f} MB/s  {ref[kind] / seconds:4.2f}x the plain {kind} speed")


def test_plain_write(benchmark, setup):
    tmp, model, _, nbytes, ref = setup
    path = tmp / "plain.bin"

    def write():
        with open(path, "wb") as fh:
            for full, _, _ in model.values():
                full.tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())

    benchmark.pedantic(write, rounds=3, warmup_rounds=1, iterations=1)
    _report(benchmark, "plain write", nbytes, ref, "write")


def test_plain_read(benchmark, setup):
    tmp, model, _, nbytes, ref = setup
    path = tmp / "plain.bin"
    if not path.exists():
        with open(path, "wb") as fh:
            for full, _, _ in model.values():
                full.tofile(fh)
    got = benchmark.pedantic(lambda: np.fromfile(path, np.float32), rounds=3, warmup_rounds=1,
                             iterations=1)
    assert got.nbytes == nbytes
    _report(benchmark, "plain read", nbytes, ref, "read")


def test_checkpoint_save_tp2(benchmark, setup):
    tmp, _, ranks, nbytes, ref = setup
    root = tmp / "ckpt"

    def save():
        shutil.rmtree(root, ignore_errors=True)
        for r in [*range(1, TP), 0]:  # rank 0 last: it merges the manifests and publishes
            save_checkpoint(root, 1, ranks[r], {}, {}, rank=r, world_size=TP, timeout=60)

    benchmark.pedantic(save, rounds=3, warmup_rounds=1, iterations=1)
    _report(benchmark, "save (2 tp ranks)", nbytes, ref, "write")


def test_checkpoint_load_one_process(benchmark, setup):
    tmp, model, ranks, nbytes, ref = setup
    root = tmp / "ckpt"
    if not (root / "step_000001").exists():
        for r in [*range(1, TP), 0]:
            save_checkpoint(root, 1, ranks[r], {}, {}, rank=r, world_size=TP, timeout=60)
    want = {n: ShardSpec.whole(full.shape) for n, (full, _, _) in model.items()}
    got = benchmark.pedantic(lambda: load_tensors(root / "step_000001", want), rounds=3,
                             warmup_rounds=1, iterations=1)
    for name, (full, _, _) in model.items():
        np.testing.assert_array_equal(got[name], full, err_msg=name)
    _report(benchmark, "load (1 process)", nbytes, ref, "read")
