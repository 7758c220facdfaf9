"""mcore.checkpoint in one process: shard specs, and save on one layout -> load on another.

"Ranks" are simulated by calling ``save_checkpoint`` once per rank (rank 0 last: it merges the
manifests); every load is compared with the slice of the known global tensor."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcore.checkpoint import (CheckpointError, Shard, ShardSpec, load_global, load_tensors,
                              save_checkpoint, shard_spec)
from mcore.checkpoint.layout import region


def local_of(full: np.ndarray, spec: ShardSpec) -> np.ndarray:
    """What a rank with ``spec`` holds of ``full`` (the reference, independent of the loader)."""
    out = np.zeros(spec.local_shape, full.dtype)
    for b in spec.blocks:
        out[region(b.local_start, b.shape)] = full[region(b.global_start, b.shape)]
    return out


def test_fused_parts_split_separately():
    # [q; k; v] rows (4, 2, 2) over tp=2: rank 1 holds q[2:4], k[1:2], v[1:2]
    spec = shard_spec((4, 3), dim=0, size=2, rank=1, parts=[4, 2, 2])
    assert spec.global_shape == (8, 3)
    assert [(b.local_start, b.global_start, b.shape) for b in spec.blocks] == [
        ((0, 0), (2, 0), (2, 3)), ((2, 0), (5, 0), (1, 3)), ((3, 0), (7, 0), (1, 3))]
    stacked = shard_spec((2, 3, 4), dim=2, size=2, rank=0, stack=(6, 2))  # experts 2..3 of 6
    assert stacked.global_shape == (6, 3, 8) and stacked.blocks[0].global_start == (2, 0, 0)
    with pytest.raises(ValueError, match="does not divide"):
        shard_spec((3, 3), dim=0, size=2, rank=0, parts=[3, 3])


def _save_layout(root, step, full, specs, zero_dp=1, name="w"):
    """Each spec is one rank; with ``zero_dp`` > 1 each spec's local array is also cut into
    ``zero_dp`` flat pieces saved by that many ranks (a distributed optimizer)."""
    ranks = []
    for spec in specs:
        flat = local_of(full, spec).reshape(-1)
        cuts = np.linspace(0, flat.size, zero_dp + 1).astype(int)
        for a, b in zip(cuts[:-1], cuts[1:]):
            ranks.append({name: Shard(flat[a:b].copy(), spec, (int(a), int(b)))} if zero_dp > 1
                         else {name: Shard(local_of(full, spec), spec)})
    world = len(ranks)
    for r in [*range(1, world), 0]:
        save_checkpoint(root, step, {}, ranks[r], {"rank": r}, rank=r, world_size=world, timeout=5)
    return root / f"step_{step:06d}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_layout_loads_any_other(tmp_path, data):
    shutil.rmtree(tmp_path / "ck", ignore_errors=True)
    nparts = data.draw(st.integers(1, 3))
    tp_save, tp_load = data.draw(st.sampled_from([1, 2, 4])), data.draw(st.sampled_from([1, 2, 4]))
    parts = [4 * data.draw(st.integers(1, 3)) for _ in range(nparts)]
    other = data.draw(st.integers(1, 5))
    dim = data.draw(st.sampled_from([0, 1]))
    shape = (sum(parts), other) if dim == 0 else (other, sum(parts))
    full = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)

    def specs(tp):
        local = list(shape)
        local[dim] //= tp
        return [shard_spec(tuple(local), dim=dim, size=tp, rank=r, parts=parts) for r in range(tp)]

    zero_dp = data.draw(st.sampled_from([1, 2, 3]))
    path = _save_layout(tmp_path / "ck", 1, full, specs(tp_save), zero_dp)
    for spec in specs(tp_load):
        got = load_tensors(path, {"w": spec})["w"]
        np.testing.assert_array_equal(got, local_of(full, spec))
    np.testing.assert_array_equal(load_global(path)["w"], full)


def test_expert_stacks_reshard_over_ep_and_etp(tmp_path):
    full = np.random.default_rng(0).standard_normal((4, 3, 8)).astype(np.float32)  # [E, h, 2f]
    def specs(ep, etp):
        return [shard_spec((4 // ep, 3, 8 // etp), dim=2, size=etp, rank=t, parts=[4, 4],
                           stack=(4, e * (4 // ep))) for e in range(ep) for t in range(etp)]
    path = _save_layout(tmp_path, 1, full, specs(2, 2))
    for spec in specs(4, 1) + specs(1, 2):
        np.testing.assert_array_equal(load_tensors(path, {"w": spec})["w"], local_of(full, spec))


def test_replicas_are_stored_once_and_errors_name_the_file_or_tensor(tmp_path):
    full = np.ones((4, 4), np.float32)
    path = _save_layout(tmp_path, 1, full, [ShardSpec.whole((4, 4))] * 3)  # three replicas
    meta = json.loads((path / "meta.json").read_text())
    assert len(meta["tensors"]["w"]["shards"]) == 1
    with pytest.raises(CheckpointError, match=r"tensor 'w' has shape \(4, 4\), this run expects \(8, 4\)"):
        load_tensors(path, {"w": ShardSpec.whole((8, 4))})
    with pytest.raises(CheckpointError, match="has no tensor 'x'"):
        load_tensors(path, {"x": ShardSpec.whole((4, 4))})
    f = path / "optim_rank0.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optim_rank0.safetensors' is corrupted"):
        load_tensors(path, {"w": ShardSpec.whole((4, 4))})


def test_missing_zero_piece_is_named(tmp_path):
    full = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = _save_layout(tmp_path, 1, full, [ShardSpec.whole((3, 4))], zero_dp=2)
    meta = json.loads((path / "meta.json").read_text())
    meta["tensors"]["w"]["shards"] = meta["tensors"]["w"]["shards"][:1]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="pieces of 'w' cover 6 of 12"):
        load_global(path)
