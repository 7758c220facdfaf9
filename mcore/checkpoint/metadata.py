"""The checkpoint format: one ``meta.json`` describing every tensor's shards and every file.

A checkpoint directory (``root/step_000010/``) holds safetensors files written by the ranks
(``model_rank{r}.safetensors``, ``optim_rank{r}.safetensors``; a rank that owns nothing of a
kind writes no file) and ``meta.json``, written last, by one rank::

    {"format": 2, "step": 10, "world_size": 4,
     "meta": {...the caller's training state: config, sampler, RNG, optimizer scalars...},
     "files": {"model_rank0.safetensors": {"bytes": N, "sha256": "..."}, ...},
     "tensors": {"<global name>": {"shape": [global shape], "dtype": "float32",
                                   "shards": [SHARD, ...]}}}

Each file stores a tensor under its global name. A SHARD says where the bytes are and which
part of the global tensor they hold: ``{"file", "local_shape", "blocks": [[local_start,
global_start, shape], ...]}`` (``mcore.checkpoint.layout.ShardSpec``), plus ``"flat": [a, b]``
when the stored array is only elements ``[a, b)`` of the row-major flattened local array (a
distributed-optimizer piece); the pieces with the same layout together make the local array.
Optimizer tensors are named ``adam_m.<param>`` / ``adam_v.<param>`` with the parameter's layout.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT_VERSION = 2
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file (and tensor) at fault."""


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    """Write ``obj`` to ``path`` and fsync it."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def read_meta(path: str | os.PathLike) -> dict:
    """Parse and sanity-check ``path/meta.json`` (``CheckpointError`` naming the file)."""
    mpath = Path(path) / META
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' has no {META} (incomplete save?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file '{mpath}' is not valid JSON (truncated?): {exc}") from None
    for key in ("format", "step", "world_size", "meta", "files", "tensors"):
        if key not in meta:
            raise CheckpointError(f"checkpoint file '{mpath}' lacks the field '{key}' (format "
                                  f"{meta.get('format', '?')}; this code reads format {FORMAT_VERSION})")
    if meta["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint file '{mpath}' has format {meta['format']}, expected "
                              f"{FORMAT_VERSION}")
    return meta


def verify_files(path: str | os.PathLike, meta: dict | None = None, check_hashes: bool = True,
                 names=None) -> None:
    """Check each listed file (or only ``names``) exists with its recorded size (and SHA-256)."""
    path = Path(path)
    meta = meta if meta is not None else read_meta(path)
    for name in sorted(meta["files"]) if names is None else names:
        rec, fpath = meta["files"].get(name), path / name
        if rec is None:
            raise CheckpointError(f"checkpoint file '{fpath}' is not listed in its {META}")
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint file '{fpath}' is missing")
        size = fpath.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"checkpoint file '{fpath}' is truncated or altered: {size} "
                                  f"bytes, expected {rec['bytes']}")
        if check_hashes and sha256(fpath) != rec["sha256"]:
            raise CheckpointError(f"checkpoint file '{fpath}' is corrupted: SHA-256 differs from {META}")


def merge_manifests(manifests: list[dict]) -> tuple[dict, dict]:
    """``(files, tensors)`` for ``meta.json`` from the ranks' manifests (``{"files": {...},
    "tensors": {name: {"shape", "dtype", "shards"}}}``, in rank order). A shard whose (layout,
    flat range) another rank already wrote is dropped (a replica written twice). Raises
    ``CheckpointError`` when two ranks disagree on a tensor's global shape or dtype."""
    files, tensors, seen = {}, {}, set()
    for rank, man in enumerate(manifests):
        files.update(man["files"])
        for name, rec in man["tensors"].items():
            cur = tensors.setdefault(name, {"shape": rec["shape"], "dtype": rec["dtype"], "shards": []})
            if (cur["shape"], cur["dtype"]) != (rec["shape"], rec["dtype"]):
                raise CheckpointError(f"rank {rank} saved tensor '{name}' as {rec['dtype']} "
                                      f"{rec['shape']}, another rank as {cur['dtype']} {cur['shape']}")
            for shard in rec["shards"]:
                key = (name, json.dumps(shard["blocks"]), json.dumps(shard.get("flat")))
                if key not in seen:
                    seen.add(key)
                    cur["shards"].append(shard)
    return files, tensors
