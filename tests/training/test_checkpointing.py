"""Checkpoints: atomic save, crash mid-save, damaged files refused by name, rotation, exact resume."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from training.checkpointing import (CheckpointError, find_latest_valid, host_rng_state, list_checkpoints,
                                    load_checkpoint, remove_incomplete, resolve_load, rotate,
                                    save_checkpoint, set_host_rng_state, step_dir)
from mcore.checkpoint import Shard, shard_spec
from training.data.sampler import GPTBatchSampler

ROOT = Path(__file__).resolve().parents[2]


def _state(seed, step=0):
    rng = np.random.default_rng(seed)
    model = {"embed.weight": rng.normal(size=(16, 8)).astype(np.float32),
             "layers.0.mlp.w": rng.normal(size=(8, 8)).astype(np.float32),
             "layers.0.norm.weight": np.ones(8, np.float32)}
    optim = {f"exp_avg.{k}": np.full(v.shape, step, np.float32) for k, v in model.items()}
    return model, optim


SHAPES = {"embed.weight": (16, 8), "layers.0.mlp.w": (8, 8), "layers.0.norm.weight": (8,)}


def test_save_then_load_round_trip(tmp_path):
    model, optim = _state(0, 10)
    meta = {"config": {"model": {"hidden_size": 8}}, "sampler": {"consumed_samples": 80}, "lr": 1e-3}
    path = save_checkpoint(tmp_path, 10, model, optim, meta)
    assert path == step_dir(tmp_path, 10) == tmp_path / "step_000010"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest_rank0.json", "meta.json", "model_rank0.safetensors", "optim_rank0.safetensors"]
    files = json.loads((path / "meta.json").read_text())["files"]
    assert set(files) == {"model_rank0.safetensors", "optim_rank0.safetensors"}
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in files.values())
    ck = load_checkpoint(path, expected_shapes=SHAPES, expected_model_config={"hidden_size": 8})
    assert ck.step == 10 and ck.meta == meta
    for k in model:
        np.testing.assert_array_equal(ck.model[k], model[k])
        np.testing.assert_array_equal(ck.optimizer[f"exp_avg.{k}"], optim[f"exp_avg.{k}"])
    assert find_latest_valid(tmp_path) == path == resolve_load("auto", tmp_path)
    assert resolve_load("none", tmp_path) is None


@pytest.mark.parametrize("phase", ["model", "optim", "manifest", "meta"])
def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, phase):
    save_checkpoint(tmp_path, 5, *_state(0, 5), {"step": 5})

    def crash(at):
        if at == phase:
            raise KeyboardInterrupt(f"killed during {at}")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 10, *_state(1, 10), {"step": 10}, fault_hook=crash)
    latest = find_latest_valid(tmp_path)
    assert latest == step_dir(tmp_path, 5) and list_checkpoints(tmp_path) == [latest]
    assert load_checkpoint(latest, expected_shapes=SHAPES).meta == {"step": 5}
    if phase == "meta":  # everything was written and verifies: start-up publishes it
        assert remove_incomplete(tmp_path, log=print) == []
        assert load_checkpoint(find_latest_valid(tmp_path)).meta == {"step": 10}
    else:
        assert remove_incomplete(tmp_path) == [tmp_path / "step_000010.tmp"]
        assert find_latest_valid(tmp_path) == step_dir(tmp_path, 5)
    save_checkpoint(tmp_path, 10, *_state(1, 10), {"step": 10})  # the next save succeeds
    assert find_latest_valid(tmp_path) == step_dir(tmp_path, 10)


def _crash_at(phase):
    def hook(at):
        if at == phase:
            raise KeyboardInterrupt(f"killed during {at}")
    return hook


def _flip_byte(path):
    """Damage a file without changing its size (only the SHA-256 notices)."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage_new", [False, True])
def test_crash_between_the_renames_of_a_resave_is_recovered(tmp_path, damage_new):
    save_checkpoint(tmp_path, 3, *_state(0, 3), {"save": "first"})
    save_checkpoint(tmp_path, 4, *_state(0, 4), {"save": "first"})
    with pytest.raises(KeyboardInterrupt):  # step_4 moved to .old, the new one still .tmp
        save_checkpoint(tmp_path, 4, *_state(1, 4), {"save": "second"}, fault_hook=_crash_at("swap"))
    assert not step_dir(tmp_path, 4).exists()
    assert (tmp_path / "step_000004.old").is_dir() and (tmp_path / "step_000004.tmp").is_dir()
    if damage_new:
        _flip_byte(tmp_path / "step_000004.tmp" / "model_rank0.safetensors")
    lines = []
    removed = remove_incomplete(tmp_path, log=lines.append)
    ck = load_checkpoint(find_latest_valid(tmp_path), expected_shapes=SHAPES)
    assert ck.step == 4 and ck.meta == {"save": "first" if damage_new else "second"}
    assert removed == [tmp_path / ("step_000004.tmp" if damage_new else "step_000004.old")]
    assert lines == [f"recovered checkpoint '{step_dir(tmp_path, 4)}' from "
                     f"'step_000004.{'old' if damage_new else 'tmp'}' (a save was interrupted)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]


CHILD = r"""
import os, sys, numpy as np
sys.path.insert(0, sys.argv[2])
from training.checkpointing import save_checkpoint
def die(phase):
    if phase == "meta":
        os._exit(9)   # hard kill: no cleanup, no exception handling
big = {"w": np.ones((512, 512), np.float32)}
save_checkpoint(sys.argv[1], 20, big, big, {"step": 20}, fault_hook=die)
"""


def test_process_killed_mid_save(tmp_path):
    save_checkpoint(tmp_path, 10, *_state(0), {"step": 10})
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(ROOT)], timeout=60)
    assert proc.returncode == 9
    assert (tmp_path / "step_000020.tmp" / "meta.json").exists()  # it died just before the rename
    assert find_latest_valid(tmp_path) == step_dir(tmp_path, 10)
    assert load_checkpoint(find_latest_valid(tmp_path)).step == 10


def test_truncated_file_is_refused_by_name(tmp_path):
    path = save_checkpoint(tmp_path, 1, *_state(0), {})
    f = path / "model_rank0.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"model_rank0\.safetensors' is truncated"):
        load_checkpoint(path)
    assert find_latest_valid(tmp_path) is None


def test_corrupted_bytes_are_refused_by_name(tmp_path):
    older = save_checkpoint(tmp_path, 1, *_state(0), {})
    path = save_checkpoint(tmp_path, 2, *_state(0), {})
    _flip_byte(path / "optim_rank0.safetensors")
    with pytest.raises(CheckpointError, match=r"optim_rank0\.safetensors' is corrupted"):
        load_checkpoint(path)
    assert find_latest_valid(tmp_path) == older  # auto-resume skips the damaged one


def test_truncated_meta_and_missing_files(tmp_path):
    path = save_checkpoint(tmp_path, 1, *_state(0), {})
    meta = path / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(CheckpointError, match=r"meta\.json' is not valid JSON"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, 2, *_state(0), {})
    (path / "optim_rank0.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optim_rank0\.safetensors' is missing"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, 3, *_state(0), {})
    (path / "model_rank0.safetensors").unlink()  # a tensor's shard lives in a missing file
    with pytest.raises(CheckpointError, match=r"model_rank0\.safetensors' is missing"):
        load_checkpoint(path)


def test_mismatched_model_is_refused_naming_the_tensor(tmp_path):
    path = save_checkpoint(tmp_path, 1, *_state(0), {"config": {"model": {"hidden_size": 8, "num_layers": 1}}})
    wrong = dict(SHAPES, **{"layers.0.mlp.w": (8, 16)})
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.0\.mlp\.w' has shape \(8, 8\), this run expects \(8, 16\)"):
        load_checkpoint(path, expected_shapes=wrong)
    with pytest.raises(CheckpointError, match="lacks tensor 'layers.1.mlp.w'"):
        load_checkpoint(path, expected_shapes=dict(SHAPES, **{"layers.1.mlp.w": (8, 8)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.norm.weight'"):
        load_checkpoint(path, expected_shapes={k: v for k, v in SHAPES.items() if "norm" not in k})
    with pytest.raises(CheckpointError, match="model.hidden_size=8, this run has model.hidden_size=16"):
        load_checkpoint(path, expected_model_config={"hidden_size": 16, "num_layers": 1})
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve_load(str(tmp_path / "nope"), tmp_path)


def test_auto_load_names_what_it_skips_and_refuses_when_nothing_verifies(tmp_path):
    assert resolve_load("auto", tmp_path / "none_yet") is None  # a fresh run
    older = save_checkpoint(tmp_path, 1, *_state(0), {})
    newer = save_checkpoint(tmp_path, 2, *_state(0), {})
    _flip_byte(newer / "model_rank0.safetensors")
    (tmp_path / "step_000003").mkdir()  # a directory without meta.json
    lines = []
    assert resolve_load("auto", tmp_path, log=lines.append) == older
    assert lines == [
        f"checkpoint.load=auto: skipping '{tmp_path / 'step_000003'}': checkpoint "
        f"'{tmp_path / 'step_000003'}' has no meta.json (incomplete save?)",
        f"checkpoint.load=auto: skipping '{newer}': checkpoint file "
        f"'{newer / 'model_rank0.safetensors'}' is corrupted: SHA-256 differs from meta.json"]
    (older / "optim_rank0.safetensors").unlink()
    lines.clear()
    with pytest.raises(CheckpointError) as err:
        resolve_load("auto", tmp_path, log=lines.append)
    msg = str(err.value)
    assert "\n" not in msg and len(lines) == 3 and "step_000001" in lines[-1]
    assert msg == (f"checkpoint.load=auto: none of the 3 checkpoint(s) under '{tmp_path}' verifies "
                   f"(newest: checkpoint '{tmp_path / 'step_000003'}' has no meta.json (incomplete "
                   f"save?)); to train from step 0 deliberately, set checkpoint.load=none or move "
                   f"'{tmp_path}' away")
    assert resolve_load("none", tmp_path) is None  # the deliberate fresh start


def test_rotation_keeps_the_verified_ones_behind_a_corrupt_newest(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, *_state(step), {})
    newest = save_checkpoint(tmp_path, 3, *_state(3), {})
    _flip_byte(newest / "optim_rank0.safetensors")  # same size: only the hash tells
    assert rotate(tmp_path, 1) == [step_dir(tmp_path, 1)]  # step 2 is the newest that verifies
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert rotate(tmp_path, 2) == []  # only one verifies: nothing goes
    save_checkpoint(tmp_path, 4, *_state(4), {}, keep_last=2)  # 4 and 2 verify; 3 is newer than 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003", "step_000004"]
    save_checkpoint(tmp_path, 5, *_state(5), {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]


def test_non_finite_tensors_are_never_saved(tmp_path):
    good = save_checkpoint(tmp_path, 1, *_state(0), {})
    model, optim = _state(1)
    model["layers.0.mlp.w"][2, 3] = np.nan
    with pytest.raises(CheckpointError, match=r"^not saving step 2 to '.*step_000002': model tensor "
                                              r"'layers\.0\.mlp\.w' has NaN or infinite values$"):
        save_checkpoint(tmp_path, 2, model, optim, {}, keep_last=1)
    model, optim = _state(1)
    optim["exp_avg.embed.weight"][0, 0] = np.inf
    with pytest.raises(CheckpointError, match="optimizer tensor 'exp_avg.embed.weight'"):
        save_checkpoint(tmp_path, 2, model, optim, {}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]


def test_keep_last_rotation_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, *_state(step), {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    save_checkpoint(tmp_path, 4, *_state(9), {"again": True}, keep_last=2)  # re-save the same step
    assert load_checkpoint(find_latest_valid(tmp_path)).meta == {"again": True}


def test_two_ranks_share_one_checkpoint(tmp_path):
    barrier = threading.Barrier(2)
    errors = []

    def rank(r):
        try:
            # rank r owns row r of the global w [2, 4]; m is replicated (written twice, kept once)
            model = {"w": Shard(np.full((1, 4), r, np.float32), shard_spec((1, 4), 0, 2, r))}
            save_checkpoint(tmp_path, 7, model, {"m": np.full(3, 2.0, np.float32)}, {"who": r},
                            rank=r, world_size=2, barrier=barrier.wait)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors
    path = find_latest_valid(tmp_path)
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck.model["w"], [[0] * 4, [1] * 4])
    assert (ck.optimizer["m"] == 2).all() and ck.meta == {"who": 0}
    assert len(json.loads((path / "meta.json").read_text())["tensors"]["m"]["shards"]) == 1


def test_resume_is_exact(tmp_path):
    """A toy run (numpy SGD on data from the sampler, noise from the host RNG) that is saved and
    resumed must reproduce the uninterrupted run bit for bit."""
    data = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)

    def run(steps, start=None, save_at=None):
        sampler = GPTBatchSampler(64, 2, 4, seed=11)
        if start is None:
            np.random.seed(3)
            w, m = np.zeros(8, np.float32), np.zeros(8, np.float32)
        else:
            ck = load_checkpoint(find_latest_valid(tmp_path), expected_shapes={"w": (8,)})
            w, m = ck.model["w"], ck.optimizer["m"]
            sampler.load_state_dict(ck.meta["sampler"])
            set_host_rng_state(ck.meta["rng"])
        losses = []
        for step in range(ck.step if start else 0, steps):
            x = data[np.concatenate(sampler.next_step())]
            noise = np.random.normal(scale=1e-3, size=8).astype(np.float32)
            g = (x @ w - 1.0) @ x / len(x) + noise
            m = 0.9 * m + g
            w = w - 0.01 * m
            losses.append(float(np.mean((x @ w - 1.0) ** 2)))
            if save_at == step + 1:
                save_checkpoint(tmp_path, step + 1, {"w": w}, {"m": m},
                                {"sampler": sampler.state_dict(), "rng": host_rng_state()})
        return losses, w

    full, w_full = run(30)
    first, _ = run(12, save_at=12)
    rest, w_resumed = run(30, start=True)
    assert first + rest == full
    np.testing.assert_array_equal(w_full, w_resumed)


RANK_PROC = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[3])
from training.checkpointing import save_checkpoint
r = int(sys.argv[2])
from mcore.checkpoint import Shard, shard_spec
w = np.full((32, 64), r, np.float32)
save_checkpoint(sys.argv[1], 3, {"w": Shard(w, shard_spec(w.shape, 0, 2, r))},
                {"m": Shard(w + 1, shard_spec(w.shape, 0, 2, r))}, {"rank": r}, rank=r,
                world_size=2, timeout=60)
"""


def test_two_processes_without_barrier(tmp_path):
    """Rank 0 publishes only after the other process's manifest appears (no collective needed)."""
    procs = [subprocess.Popen([sys.executable, "-c", RANK_PROC, str(tmp_path), str(r), str(ROOT)])
             for r in (0, 1)]
    assert [p.wait(timeout=90) for p in procs] == [0, 0]
    path = find_latest_valid(tmp_path)
    assert path == step_dir(tmp_path, 3)
    assert (load_checkpoint(path).optimizer["m"][32:] == 2).all()


def test_hf_path_does_not_block_resume(tmp_path):
    path = save_checkpoint(tmp_path, 1, *_state(0), {"config": {"model": {"hidden_size": 8, "hf_path": "/a"}}})
    assert load_checkpoint(path, expected_model_config={"hidden_size": 8, "hf_path": None}).step == 1


CRASH_PROC = r"""
import os, sys, numpy as np
sys.path.insert(0, sys.argv[4])
from mcore.checkpoint import CheckpointError, Shard, shard_spec
from training.checkpointing import save_checkpoint
root, r, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
w = np.full((32, 64), step, np.float32)
def die(phase):  # rank 1 is killed right after writing its weights, in the second save
    if r == 1 and step == 2 and phase == "model":
        os._exit(9)
try:
    save_checkpoint(root, step, {"w": Shard(w, shard_spec(w.shape, 0, 2, r))},
                    {"m": Shard(w + 1, shard_spec(w.shape, 0, 2, r))}, {"step": step}, rank=r,
                    world_size=2, timeout=3, fault_hook=die)
except CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""


def test_rank_killed_mid_save_keeps_the_previous_checkpoint(tmp_path):
    """Two processes save step 1, then rank 1 dies while writing step 2: rank 0 gives up with
    one line naming the missing rank, auto-resume still picks step 1 (whole and correct), and
    the start-up clean-up removes the half-written directory."""
    def save(step):
        procs = [subprocess.Popen([sys.executable, "-c", CRASH_PROC, str(tmp_path), str(r),
                                   str(step), str(ROOT)], stdout=subprocess.PIPE, text=True)
                 for r in (0, 1)]
        return [(p.wait(timeout=90), p.stdout.read()) for p in procs]

    assert [rc for rc, _ in save(1)] == [0, 0]
    (rc0, out0), (rc1, _) = save(2)
    assert (rc0, rc1) == (3, 9) and "rank 1 did not finish writing" in out0, out0
    assert (tmp_path / "step_000002.tmp" / "model_rank1.safetensors").exists()
    assert resolve_load("auto", tmp_path) == step_dir(tmp_path, 1)
    ck = load_checkpoint(step_dir(tmp_path, 1))
    assert ck.step == 1 and (ck.model["w"] == 1).all() and (ck.optimizer["m"] == 2).all()
    assert remove_incomplete(tmp_path) == [tmp_path / "step_000002.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
