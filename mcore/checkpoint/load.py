"""Read any layout's slices out of a distributed checkpoint (resharding on load).

``load_tensors(path, requests)``: ``requests`` maps a global name to the ``ShardSpec`` of the
array THIS rank needs (its local shape, the global shape it expects, its blocks). For each
request the saved shards overlapping its blocks are read (only those files, each verified
against ``meta.json`` first: size and SHA-256) and the overlaps copied in; distributed-optimizer
pieces (``"flat"``) of one saved layout are joined into that layout's local array first. A
local region outside every block (none today) stays zero.

Errors (``CheckpointError``, one line): a missing or corrupted file (named), a tensor the
checkpoint lacks, a global shape that differs from the request (another model size; the tensor
and both shapes are named), or saved shards that do not cover a requested block.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from safetensors import safe_open

from mcore.checkpoint.layout import ShardSpec, intersect, region
from mcore.checkpoint.metadata import CheckpointError, read_meta, verify_files


class _Files:
    """Verified, opened safetensors files of one checkpoint (each verified once)."""

    def __init__(self, path: Path, meta: dict, check_hashes: bool, stack: ExitStack):
        self.path, self.meta, self.check, self.stack, self.open = path, meta, check_hashes, stack, {}

    def get(self, fname: str):
        if fname not in self.open:
            verify_files(self.path, self.meta, self.check, [fname])
            try:
                self.open[fname] = self.stack.enter_context(
                    safe_open(str(self.path / fname), framework="numpy"))
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"checkpoint file '{self.path / fname}' cannot be read: {exc}") from None
        return self.open[fname]


def _saved_layouts(name: str, rec: dict) -> dict[str, tuple[ShardSpec, list[dict]]]:
    """The saved shards of one tensor grouped by layout: key -> (spec, [shard records])."""
    groups = {}
    for shard in rec["shards"]:
        spec = ShardSpec.from_json(shard, rec["shape"])
        groups.setdefault(spec.key(), (spec, []))[1].append(shard)
    return groups


def _joined(files: _Files, name: str, spec: ShardSpec, shards: list[dict]) -> np.ndarray:
    """The local array of one saved layout from its flat pieces (must cover it exactly)."""
    numel = int(np.prod(spec.local_shape, dtype=np.int64))
    flat, seen = None, np.zeros(numel, bool)
    for shard in shards:
        a, b = (int(x) for x in shard["flat"])
        piece = files.get(shard["file"]).get_tensor(name).reshape(-1)
        if flat is None:
            flat = np.zeros(numel, piece.dtype)
        if piece.size != b - a or a < 0 or b > numel or seen[a:b].any():
            raise CheckpointError(f"checkpoint file '{files.path / shard['file']}': piece "
                                  f"[{a}, {b}) of '{name}' is malformed or overlaps another")
        flat[a:b], seen[a:b] = piece, True
    if not seen.all():
        raise CheckpointError(f"checkpoint '{files.path}': the pieces of '{name}' cover "
                              f"{int(seen.sum())} of {numel} elements (a rank's file missing?)")
    return flat.reshape(spec.local_shape)


def _load_one(files: _Files, name: str, rec: dict, want: ShardSpec) -> np.ndarray:
    if tuple(rec["shape"]) != tuple(want.global_shape):
        raise CheckpointError(f"checkpoint '{files.path}': tensor '{name}' has shape "
                              f"{tuple(rec['shape'])}, this run expects {tuple(want.global_shape)} "
                              "(another model size?)")
    out = np.zeros(want.local_shape, np.dtype(rec["dtype"]))
    filled = [0] * len(want.blocks)
    for spec, shards in _saved_layouts(name, rec).values():
        hits = [(i, b, s, hit) for i, b in enumerate(want.blocks) for s in spec.blocks
                if (hit := intersect(b.global_start, b.shape, s.global_start, s.shape))]
        if not hits:
            continue
        whole = _joined(files, name, spec, shards) if "flat" in shards[0] else None
        for i, b, s, (start, shape) in hits:
            src = tuple(ls + g - gs for ls, g, gs in zip(s.local_start, start, s.global_start))
            dst = tuple(ls + g - gs for ls, g, gs in zip(b.local_start, start, b.global_start))
            if whole is not None:
                part = whole[region(src, shape)]
            else:
                part = files.get(shards[0]["file"]).get_slice(name)[region(src, shape)]
            out[region(dst, shape)] = part
            filled[i] += int(np.prod(shape, dtype=np.int64))
    for b, n in zip(want.blocks, filled):
        if n != int(np.prod(b.shape, dtype=np.int64)):
            raise CheckpointError(f"checkpoint '{files.path}': the saved shards of '{name}' do "
                                  f"not cover the region {b.global_start} + {b.shape} "
                                  f"({n} elements found)")
    return out


def load_tensors(path: str | os.PathLike, requests: dict[str, ShardSpec], meta: dict | None = None,
                 check_hashes: bool = True) -> dict[str, np.ndarray]:
    """This rank's arrays (global name -> local array of ``requests[name].local_shape``)."""
    path = Path(path)
    meta = meta if meta is not None else read_meta(path)
    out = {}
    with ExitStack() as stack:
        files = _Files(path, meta, check_hashes, stack)
        for name, want in requests.items():
            rec = meta["tensors"].get(name)
            if rec is None:
                raise CheckpointError(f"checkpoint '{path}' has no tensor '{name}' (another model?)")
            out[name] = _load_one(files, name, rec, want)
    return out


def load_global(path: str | os.PathLike, names=None, prefix: str | None = None,
                meta: dict | None = None, check_hashes: bool = True) -> dict[str, np.ndarray]:
    """Whole (one-process) tensors: ``names``, or every tensor (optionally only those whose name
    starts with ``prefix``)."""
    meta = meta if meta is not None else read_meta(path)
    if names is None:
        names = [n for n in meta["tensors"] if prefix is None or n.startswith(prefix)]
    missing = [n for n in names if n not in meta["tensors"]]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' has no tensor '{missing[0]}' (another model?)")
    return load_tensors(path, {n: ShardSpec.whole(meta["tensors"][n]["shape"]) for n in names},
                        meta, check_hashes)
