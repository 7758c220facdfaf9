"""Training checkpoints: the training side of ``mcore.checkpoint`` (one format, any layout).

A checkpoint (``root/step_000010/``) holds each rank's owned shards under global names and one
``meta.json`` (``mcore.checkpoint.metadata``: tensors, shards, file hashes) whose ``meta``
field is the training state: ``config``, ``sampler`` (data position), ``rng`` (host RNG),
``optimizer`` (``{"adam_steps": n}``) and ``tokenizer``. ``save_train_state`` writes this
rank's part (``training.checkpoint_layout`` decides what it owns); ``load_train_state`` reads
the slices this rank's layout needs, whatever layout wrote them (tp, pp, vpp, dp, ep, etp and
the distributed optimizer may all differ), into weights, AdamW moments and update count.

Atomicity, verification, ``checkpoint.load=auto`` (newest checkpoint that verifies), rotation
and the repair of interrupted saves are ``mcore.checkpoint``'s, re-exported here.
``load_checkpoint`` reads whole (one-process) tensors, e.g. for tools and tests.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcore.checkpoint import ShardSpec, load_tensors
# re-exported: the training side's one import for checkpoints
from mcore.checkpoint import (CheckpointError, find_latest_valid, first_nonfinite,  # noqa: F401
                              list_checkpoints, read_meta, remove_incomplete, resolve_load,
                              rotate, save_checkpoint, scan, step_dir, step_dirs, verify_files,
                              why_invalid)

INIT_ONLY_KEYS = frozenset({"hf_path"})  # model keys that only matter before the first step
# model keys that change how a step runs, not the weights: a resume may change them
EXECUTION_KEYS = frozenset({"attention_block_size", "recompute_layers"})


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: whole tensors by kind, and the training state."""

    path: Path
    step: int
    model: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    meta: dict


def check_model_config(path: Path, meta: dict, expected: dict | None) -> None:
    """Refuse a checkpoint whose saved ``model`` section differs from ``expected`` in a key that
    shapes the weights (``CheckpointError`` naming the key and ``meta.json``)."""
    saved = (meta["meta"].get("config") or {}).get("model")
    if expected is None or saved is None:
        return
    for key in sorted((set(saved) | set(expected)) - INIT_ONLY_KEYS - EXECUTION_KEYS):
        if saved.get(key) != expected.get(key):
            raise CheckpointError(f"checkpoint file '{path / 'meta.json'}' is for model.{key}="
                                  f"{saved.get(key)!r}, this run has model.{key}={expected.get(key)!r}")


def tensor_kinds(meta: dict) -> dict[str, str]:
    """Global name -> ``"model"`` or ``"optim"`` (the kind of file its shards live in)."""
    return {n: rec["shards"][0]["file"].split("_rank", 1)[0] for n, rec in meta["tensors"].items()}


def _expect(path: Path, kinds: dict, kind: str, expected: dict | None) -> dict:
    names = sorted(n for n, k in kinds.items() if k == kind)
    if expected is None:
        return names
    missing = sorted(set(expected) - set(names))
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks tensor '{missing[0]}'"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + " (from another model?)")
    extra = sorted(set(names) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint '{path}' has unexpected tensor '{extra[0]}' (from "
                              "another model?)")
    return names


def load_checkpoint(path: str | os.PathLike, expected_shapes: dict | None = None,
                    expected_optimizer_shapes: dict | None = None,
                    expected_model_config: dict | None = None, check_hashes: bool = True) -> Checkpoint:
    """Whole (one-process) tensors of checkpoint ``path``, whatever layout wrote it.
    ``expected_shapes`` / ``expected_optimizer_shapes`` (name -> global shape): refuse missing,
    unexpected or differently shaped tensors; ``expected_model_config``: see
    ``check_model_config``. Every error is a ``CheckpointError`` naming the file or tensor."""
    path = Path(path)
    meta = read_meta(path)
    check_model_config(path, meta, expected_model_config)
    kinds, out = tensor_kinds(meta), []
    for kind, expected in (("model", expected_shapes), ("optim", expected_optimizer_shapes)):
        names = _expect(path, kinds, kind, expected)
        shapes = expected or {n: meta["tensors"][n]["shape"] for n in names}
        out.append(load_tensors(path, {n: ShardSpec.whole(shapes[n]) for n in names}, meta,
                                check_hashes))
    return Checkpoint(path, int(meta["step"]), out[0], out[1], meta["meta"])


def save_train_state(root, step: int, step_fn, dims, meta: dict, keep_last: int = 0,
                     barrier=None) -> Path:
    """Every rank writes what it owns of ``step_fn``'s weights and moments (call on every rank;
    ``barrier`` with several). ``meta``: the training state, stored in ``meta.json``."""
    from training.checkpoint_layout import owned_state

    model, optim = owned_state(step_fn, dims)
    meta = dict(meta, optimizer=step_fn.scalars())
    return save_checkpoint(root, step, model, optim, meta, rank=dims.global_rank,
                           world_size=dims.world_size, keep_last=keep_last, barrier=barrier)


def load_train_state(path, step_fn, dims, model_config: dict | None = None,
                     weights_only: bool = False) -> dict:
    """Load this rank's slices of checkpoint ``path`` into ``step_fn`` (weights, buffers and,
    unless ``weights_only``, the AdamW moments and update count); return the saved training
    state (``meta``, with ``"step"`` added). Full loads may be repeated after steps have run
    (``TrainState.load`` then writes in place); ``weights_only`` is for before the first step."""
    from training.checkpoint_layout import requests

    path = Path(path)
    meta = read_meta(path)
    check_model_config(path, meta, model_config)
    model_req, optim_req = requests(step_fn, dims)
    if weights_only:
        import mindspore as ms

        weights = load_tensors(path, model_req, meta)
        for n, p in [*step_fn.named, *step_fn.buffers]:
            p.set_data(ms.Tensor(weights[n], ms.float32))
    else:
        tensors = load_tensors(path, {**model_req, **optim_req}, meta)
        scalars = meta["meta"].get("optimizer", {"adam_steps": meta["step"]})
        step_fn.load(tensors, tensors, scalars)
    return dict(meta["meta"], step=int(meta["step"]))


# ----------------------------------------------------------------------------- host RNG state

def host_rng_state() -> dict:
    """Python's and NumPy's global RNG states as JSON-serialisable values (for ``meta``)."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def set_host_rng_state(state: dict) -> None:
    """Restore what ``host_rng_state`` captured."""
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
