"""Write one distributed checkpoint atomically: every rank its own shards, one rank the metadata.

Each rank passes only what it owns (a replica is written by one rank: the caller decides, e.g.
dp rank 0 and tp rank 0 for a replicated weight): per kind (``model``, ``optim``), global name ->
a numpy array (the whole tensor) or a ``Shard`` (array + ``ShardSpec`` [+ flat range]). Saving
writes ``{kind}_rank{r}.safetensors`` into ``root/step_N.tmp/``, fsyncs it and publishes a small
``manifest_rank{r}.json`` (the file's size and SHA-256, its tensors' global shapes and
blocks). After the caller's ``barrier`` (or, without one, once every manifest exists), rank 0
writes ``meta.json`` (``mcore.checkpoint.metadata``), then renames ``step_N.tmp`` to ``step_N``
(atomic on POSIX) and fsyncs the root: a crash at any moment leaves the complete new
checkpoint or none, and the older ones untouched. Re-saving a step moves ``step_N`` to
``step_N.old`` first (``store.remove_incomplete`` repairs a crash between the two renames).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

from mcore.checkpoint.layout import ShardSpec
from mcore.checkpoint.metadata import (FORMAT_VERSION, META, CheckpointError, fsync_dir, fsync_file,
                                       merge_manifests, sha256, write_json)
from mcore.checkpoint.store import rotate, step_dir

KINDS = ("model", "optim")


@dataclass
class Shard:
    """A local array, where it sits in the global tensor, and (a distributed-optimizer piece)
    the range ``[a, b)`` of the flattened local array it holds (then ``value`` is 1-D)."""

    value: np.ndarray
    spec: ShardSpec
    flat: tuple[int, int] | None = None


def as_shard(value) -> Shard:
    if isinstance(value, Shard):
        return value
    value = np.asarray(value)
    return Shard(value, ShardSpec.whole(value.shape))


def first_nonfinite(state: dict) -> str | None:
    """Name of the first tensor of ``state`` (name -> array or ``Shard``) with a NaN or an inf."""
    for name in sorted(state):
        arr = np.asarray(as_shard(state[name]).value)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            return name
    return None


def _write_kind(tmp: Path, kind: str, rank: int, step: int, state: dict) -> tuple[dict, dict]:
    """Write one file of ``state``; return its ``(files, tensors)`` manifest entries."""
    if not state:
        return {}, {}
    fname = f"{kind}_rank{rank}.safetensors"
    arrays, tensors = {}, {}
    for name, item in state.items():
        sh = as_shard(item)
        value = np.ascontiguousarray(sh.value)
        expected = (sh.flat[1] - sh.flat[0],) if sh.flat else sh.spec.local_shape
        if tuple(value.shape) != tuple(expected):
            raise ValueError(f"tensor '{name}': array of shape {value.shape}, its spec says {expected}")
        arrays[name] = value
        shard = dict(sh.spec.to_json(), file=fname, **({"flat": list(sh.flat)} if sh.flat else {}))
        tensors[name] = {"shape": list(sh.spec.global_shape), "dtype": str(value.dtype),
                         "shards": [shard]}
    save_file(arrays, str(tmp / fname), metadata={"step": str(step), "rank": str(rank)})
    fsync_file(tmp / fname)
    return {fname: {"bytes": (tmp / fname).stat().st_size, "sha256": sha256(tmp / fname)}}, tensors


def _wait_manifests(tmp: Path, world_size: int, timeout: float, wait: bool) -> list[dict]:
    out = []
    for r in range(world_size):
        m, t0 = tmp / f"manifest_rank{r}.json", time.monotonic()
        while wait and not m.exists():
            if time.monotonic() - t0 > timeout:
                raise CheckpointError(f"rank {r} did not finish writing '{m}' within {timeout:.0f} s")
            time.sleep(0.05)
        out.append(json.loads(m.read_text()))
    return out


def _publish(root: Path, tmp: Path, final: Path, hook) -> None:
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step: move the old one aside first
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        hook("swap")  # a crash here leaves .old and .tmp: store.remove_incomplete recovers
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)


def save_checkpoint(root: str | os.PathLike, step: int, model_state: dict, optimizer_state: dict,
                    meta: dict, rank: int = 0, world_size: int = 1, keep_last: int = 0,
                    barrier: Callable[[], None] | None = None, timeout: float = 600.0,
                    fault_hook: Callable[[str], None] | None = None) -> Path:
    """Save this rank's part of checkpoint ``step``; return the final directory.

    ``model_state`` / ``optimizer_state``: global name -> array or ``Shard``, only what this
    rank owns. ``meta``: JSON-serialisable training state; rank 0's is kept. A tensor with a NaN
    or an infinity raises ``CheckpointError`` naming it before anything is written (with several
    ranks, agree on finiteness first). ``keep_last > 0``: ``store.rotate`` afterwards. Ranks
    other than 0 return once their files are written (with ``barrier``: once rank 0 has
    published). ``fault_hook(phase)`` runs after each phase (``"model"``, ``"optim"``,
    ``"manifest"``, ``"meta"``, ``"swap"``); tests raise from it to simulate a crash.
    """
    root, hook = Path(root), fault_hook or (lambda phase: None)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    for kind, state in (("model", model_state), ("optimizer", optimizer_state)):
        if (bad := first_nonfinite(state)) is not None:
            raise CheckpointError(f"not saving step {step} to '{final}': {kind} tensor '{bad}' "
                                  "has NaN or infinite values")
    if world_size == 1:  # nobody else writes here: drop leftovers of an interrupted save
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    manifest = {"files": {}, "tensors": {}}
    for kind, state in zip(KINDS, (model_state, optimizer_state)):
        files, tensors = _write_kind(tmp, kind, rank, step, state)
        manifest["files"].update(files)
        manifest["tensors"].update(tensors)
        hook(kind)
    part = tmp / f"manifest_rank{rank}.json.part"
    write_json(part, manifest)
    os.replace(part, tmp / f"manifest_rank{rank}.json")
    hook("manifest")
    if barrier is not None:
        barrier()
    if rank == 0:
        files, tensors = merge_manifests(_wait_manifests(tmp, world_size, timeout, barrier is None))
        write_json(tmp / META, {"format": FORMAT_VERSION, "step": int(step),
                                "world_size": int(world_size), "meta": meta, "files": files,
                                "tensors": tensors})
        hook("meta")
        _publish(root, tmp, final, hook)
        if keep_last > 0:
            rotate(root, keep_last)
    if barrier is not None:
        barrier()
    return final
