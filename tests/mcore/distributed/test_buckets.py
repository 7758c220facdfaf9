"""Bucket / shard arithmetic of the distributed optimizer (``mcore.distributed.buckets``) and the
resharding of its checkpointed moments (flat pieces read back by ``mcore.checkpoint``), on generated
sizes: every element of every parameter is owned by exactly one rank, shards are contiguous and
equal, and moments cut into pieces for one (dp, bucket_size) and reassembled are the originals."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mcore.distributed.buckets import bucket_layout
from mcore.checkpoint import CheckpointError, Shard, ShardSpec, load_global, save_checkpoint

shapes = st.lists(st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple), min_size=1,
                  max_size=8)


def _params(shape_list):
    return [(f"p{i}", s) for i, s in enumerate(shape_list)]


@settings(max_examples=200, deadline=None)
@given(shape_list=shapes, dp=st.integers(1, 5), bucket_size=st.integers(1, 120))
def test_every_element_owned_once_and_shards_equal(shape_list, dp, bucket_size):
    params = _params(shape_list)
    layout = bucket_layout(params, dp, bucket_size)
    # buckets: parameters end to end, in order, never cut; each closed at >= bucket_size
    slots = [s for b in layout.buckets for s in b.slots]
    assert [s.name for s in slots] == [n for n, _ in params]
    for b in layout.buckets:
        assert b.padded % dp == 0 and b.shard_size * dp == b.padded
        assert b.numel <= b.padded < b.numel + dp or (b.numel == 0 and b.padded == dp)
        assert [s.offset for s in b.slots] == list(np.cumsum([0] + [s.numel for s in b.slots])[:-1])
    for b in layout.buckets[:-1]:
        assert b.numel >= bucket_size and b.numel - b.slots[-1].numel < bucket_size
    owner = {n: np.full(math.prod(s), -1) for n, s in params}
    for r in range(dp):
        used = {}
        for p in layout.pieces(r):
            seg = owner[p.name][p.param_offset:p.param_offset + p.length]
            assert (seg == -1).all()  # nobody else owns these elements
            seg[:] = r
            used.setdefault(p.bucket, []).append((p.shard_offset, p.length))
            slot = next(s for s in layout.buckets[p.bucket].slots if s.name == p.name)
            # the piece sits in the shard where the bucket arithmetic puts it
            shard = layout.buckets[p.bucket].shard_size
            assert slot.offset + p.param_offset == r * shard + p.shard_offset
        for b, segs in used.items():  # pieces of one shard are contiguous and in order
            ends = [o + n for o, n in segs]
            assert [o for o, _ in segs][1:] == ends[:-1]
            assert ends[-1] <= layout.buckets[b].shard_size
    assert all((o >= 0).all() for o in owner.values())
    assert layout.shard_elements * dp == sum(b.padded for b in layout.buckets)


def _save_pieces(root, params, full, dp, bucket_size, drop=None):
    """Save what each rank of a distributed run writes (its pieces as flat ranges of the whole
    parameter, ``training.checkpoint_layout``); ``drop``: a (rank, tensor) left out."""
    layout = bucket_layout(params, dp, bucket_size)
    states = []
    for r in range(dp):
        t = {}
        for p in layout.pieces(r):
            lo, hi = p.param_offset, p.param_offset + p.length
            for kind in ("m", "v"):
                key = f"adam_{kind}.{p.name}"
                if (r, key) != drop:
                    t[key] = Shard(full[key].reshape(-1)[lo:hi].copy(), ShardSpec.whole(p.shape),
                                   (lo, hi))
        states.append(t)
    for r in [*range(1, dp), 0]:
        save_checkpoint(root, 1, {}, states[r], {}, rank=r, world_size=dp, timeout=5)
    return root / "step_000001"


@settings(max_examples=40, deadline=None)
@given(shape_list=shapes, dp=st.integers(1, 4), bucket_size=st.integers(1, 80),
       seed=st.integers(0, 2 ** 16))
def test_sharded_moments_reassemble_to_the_originals(shape_list, dp, bucket_size, seed):
    params = _params(shape_list)
    rng = np.random.default_rng(seed)
    full = {f"adam_{k}.{n}": rng.standard_normal(s).astype(np.float32)
            for n, s in params for k in ("m", "v")}
    with tempfile.TemporaryDirectory() as tmp:
        got = load_global(_save_pieces(Path(tmp), params, full, dp, bucket_size))
    assert sorted(got) == sorted(full)
    for k in full:
        np.testing.assert_array_equal(got[k], full[k], err_msg=k)


def test_missing_pieces_are_refused(tmp_path):
    params = [("a", (4, 3)), ("b", (5,))]
    full = {f"adam_{k}.{n}": np.ones(s, np.float32) for n, s in params for k in ("m", "v")}
    path = _save_pieces(tmp_path, params, full, 2, 100, drop=(1, "adam_m.a"))
    with pytest.raises(CheckpointError, match="pieces of 'adam_m.a' cover 9 of 12 elements"):
        load_global(path)
