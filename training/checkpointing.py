"""Atomic, sharded checkpoints: safetensors per rank plus a ``meta.json`` manifest.

Layout of one checkpoint (``root/step_000010/``)::

    model_rank0.safetensors   this rank's parameters (numpy arrays by name)
    optim_rank0.safetensors   this rank's optimizer tensors (fp32 master weights, Adam moments)
    ...                       one pair per rank
    meta.json                 {"format": 1, "step", "world_size", "meta": {...caller's: config,
                              RNG, sampler, optimizer scalars...}, "files": {name: {bytes, sha256}}}

Saving writes everything into ``root/step_000010.tmp/``, fsyncs each file, and only then renames
the directory to ``step_000010`` (an atomic rename on POSIX) and fsyncs ``root``. A crash at any
moment leaves either the complete new checkpoint or none, and the previous ones untouched.
``meta.json`` is the last file written, so a directory without a valid one is never loaded.
Re-saving an existing step moves ``step_N`` to ``step_N.old`` and ``step_N.tmp`` to ``step_N``;
``remove_incomplete`` (rank 0, at start-up) repairs a crash between those two renames by
publishing whichever of the two verifies (the new one first). Weights or optimizer tensors with
a NaN or an infinity are never written (``CheckpointError`` naming the tensor).

With several ranks (a shared filesystem), every rank writes its two files and a small
``manifest_rank{r}.json`` into the temporary directory; rank 0 waits for all manifests (or the
caller's ``barrier``), writes ``meta.json`` and renames. Call ``remove_incomplete(root)`` on rank
0 at start-up (before other ranks save) to clear leftovers of a crashed save.

Rotation (``keep_last``) deletes a checkpoint only when ``keep_last`` newer checkpoints have
verified (sizes and SHA-256), so a damaged newest checkpoint never costs the valid older ones.
``checkpoint.load=auto`` (``resolve_load``) reports every checkpoint it skips and why, and refuses
(rather than silently starting at step 0) when checkpoints exist but none verifies.

Loading checks the manifest before trusting any byte: every file must exist with the recorded
size and SHA-256, and, when the caller passes expected shapes, every tensor must be present with
that shape. Any mismatch raises ``CheckpointError`` naming the file (and the tensor).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file, save_file

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{6,})$")
INIT_ONLY_KEYS = frozenset({"hf_path"})  # model keys that only matter before the first step
# model keys that change how a step runs, not the weights: a resume may change them
EXECUTION_KEYS = frozenset({"attention_block_size", "recompute_layers"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file (and tensor) at fault."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns for one rank."""

    path: Path
    step: int
    model: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    meta: dict


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _tensors(d: dict) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in d.items()}


def _say(line: str) -> None:
    """Default ``log`` of ``resolve_load`` / ``remove_incomplete``: one line on stderr."""
    print(line, file=sys.stderr, flush=True)


def first_nonfinite(state: dict) -> str | None:
    """Name of the first tensor of ``state`` (name -> array) holding a NaN or an infinity."""
    for name in sorted(state):
        arr = np.asarray(state[name])
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            return name
    return None


def save_checkpoint(root: str | os.PathLike, step: int, model_state: dict, optimizer_state: dict,
                    meta: dict, rank: int = 0, world_size: int = 1, keep_last: int = 0,
                    barrier: Callable[[], None] | None = None, timeout: float = 600.0,
                    fault_hook: Callable[[str], None] | None = None) -> Path:
    """Save this rank's part of checkpoint ``step``; return the final directory.

    ``model_state`` / ``optimizer_state``: name -> numpy array. ``meta``: JSON-serialisable dict
    (config, RNG state, sampler state, optimizer scalars); rank 0's is the one kept.
    ``keep_last > 0`` then rotates (``rotate``: only behind ``keep_last`` verified checkpoints).
    A tensor with a NaN or an infinity raises ``CheckpointError`` naming it before anything is
    written (with several ranks, agree on finiteness first, or the others wait for this rank).
    Ranks other than 0 return once their files are written (with ``barrier``: once rank 0 has
    published the checkpoint). ``fault_hook(phase)`` is called after each phase (``"model"``,
    ``"optim"``, ``"manifest"``, ``"meta"``, and ``"swap"`` between the two renames of a
    re-save); tests raise from it to simulate a crash.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    hook = fault_hook or (lambda phase: None)
    for kind, state in (("model", model_state), ("optimizer", optimizer_state)):
        if (bad := first_nonfinite(state)) is not None:
            raise CheckpointError(f"not saving step {step} to '{final}': {kind} tensor '{bad}' "
                                  "has NaN or infinite values")
    if world_size == 1:  # nobody else writes here: drop leftovers of an interrupted save
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, state in (("model", model_state), ("optim", optimizer_state)):
        name = f"{kind}_rank{rank}.safetensors"
        save_file(_tensors(state), str(tmp / name), metadata={"step": str(step), "rank": str(rank)})
        _fsync_file(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        hook(kind)
    manifest = tmp / f"manifest_rank{rank}.json"
    _write_json(manifest.with_suffix(".json.part"), files)
    os.replace(manifest.with_suffix(".json.part"), manifest)
    hook("manifest")
    if barrier is not None:
        barrier()
    if rank == 0:
        all_files = {}
        for r in range(world_size):
            m = tmp / f"manifest_rank{r}.json"
            t0 = time.monotonic()
            while barrier is None and not m.exists():
                if time.monotonic() - t0 > timeout:
                    raise CheckpointError(
                        f"rank {r} did not finish writing '{m}' within {timeout:.0f} s")
                time.sleep(0.05)
            all_files.update(json.loads(m.read_text()))
        _write_json(tmp / "meta.json", {"format": FORMAT_VERSION, "step": int(step),
                                        "world_size": int(world_size), "meta": meta, "files": all_files})
        hook("meta")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            hook("swap")  # a crash here leaves .old and .tmp: remove_incomplete recovers
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            rotate(root, keep_last)
    if barrier is not None:
        barrier()
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint directories (``step_N`` with a ``meta.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def read_meta(path: str | os.PathLike) -> dict:
    """Parse and sanity-check ``path/meta.json``."""
    mpath = Path(path) / "meta.json"
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' has no meta.json (incomplete save?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint file '{mpath}' is not valid JSON (truncated?): {exc}") from None
    for key in ("format", "step", "world_size", "meta", "files"):
        if key not in meta:
            raise CheckpointError(f"checkpoint file '{mpath}' lacks the field '{key}'")
    if meta["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file '{mpath}' has format {meta['format']}, expected {FORMAT_VERSION}")
    return meta


def verify_files(path: str | os.PathLike, meta: dict | None = None, check_hashes: bool = True,
                 names: list[str] | None = None) -> None:
    """Check each listed file (or only ``names``) exists with its recorded size (and SHA-256)."""
    path = Path(path)
    meta = meta if meta is not None else read_meta(path)
    for name in names if names is not None else sorted(meta["files"]):
        rec = meta["files"].get(name)
        fpath = path / name
        if rec is None:
            raise CheckpointError(f"checkpoint file '{fpath}' is not listed in its meta.json "
                                  f"(saved with world_size={meta['world_size']})")
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint file '{fpath}' is missing")
        size = fpath.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"checkpoint file '{fpath}' is truncated or altered: "
                                  f"{size} bytes, expected {rec['bytes']}")
        if check_hashes and _sha256(fpath) != rec["sha256"]:
            raise CheckpointError(
                f"checkpoint file '{fpath}' is corrupted: SHA-256 differs from meta.json")


def is_valid(path: str | os.PathLike, check_hashes: bool = False) -> bool:
    return why_invalid(path, check_hashes) is None


def why_invalid(path: str | os.PathLike, check_hashes: bool = True) -> str | None:
    """Why the checkpoint in ``path`` cannot be used (a ``CheckpointError`` message), or ``None``."""
    try:
        verify_files(path, check_hashes=check_hashes)
        return None
    except CheckpointError as exc:
        return str(exc)


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """Every ``step_N`` directory under ``root`` (with or without ``meta.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def scan(root: str | os.PathLike, check_hashes: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest checkpoint that verifies or None, [(newer checkpoint, why it fails), ...])``,
    the skipped ones newest first."""
    skipped = []
    for p in reversed(step_dirs(root)):
        why = why_invalid(p, check_hashes)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def find_latest_valid(root: str | os.PathLike, check_hashes: bool = True) -> Path | None:
    """The newest checkpoint under ``root`` whose files all verify, or ``None``."""
    return scan(root, check_hashes)[0]


def resolve_load(load: str, root: str | os.PathLike,
                 log: Callable[[str], None] | None = None) -> Path | None:
    """Interpret ``checkpoint.load``: ``'none'`` -> None, anything else but ``'auto'`` -> that
    directory (which must exist), ``'auto'`` -> the newest checkpoint under ``root`` that verifies
    (sizes and SHA-256), or None when there is no ``step_N`` directory at all. ``auto`` calls
    ``log`` with one line per newer checkpoint it skips (naming it and why) and raises
    ``CheckpointError`` when checkpoints exist but none verifies."""
    if load == "none":
        return None
    if load != "auto":
        path = Path(load)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.load='{load}' is not a checkpoint directory")
        return path
    path, skipped = scan(root)
    for bad, why in skipped:
        (log or _say)(f"checkpoint.load=auto: skipping '{bad}': {why}")
    if path is None and skipped:
        raise CheckpointError(
            f"checkpoint.load=auto: none of the {len(skipped)} checkpoint(s) under '{root}' "
            f"verifies (newest: {skipped[0][1]}); to train from step 0 deliberately, set "
            f"checkpoint.load=none or move '{root}' away")
    return path


def _check_tensors(fpath: Path, got: dict[str, np.ndarray], expected: dict[str, tuple] | None) -> None:
    if expected is None:
        return
    missing = sorted(set(expected) - set(got))
    if missing:
        raise CheckpointError(f"checkpoint file '{fpath}' lacks tensor '{missing[0]}'"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + " (saved with another parallel layout or model?)")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint file '{fpath}' has unexpected tensor '{extra[0]}' "
                              "(from another model?)")
    for name, shape in expected.items():
        if tuple(got[name].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint file '{fpath}': tensor '{name}' has shape "
                                  f"{tuple(got[name].shape)}, expected {tuple(shape)}")


def load_checkpoint(path: str | os.PathLike, rank: int = 0, world_size: int | None = None,
                    expected_shapes: dict[str, tuple] | None = None,
                    expected_optimizer_shapes: dict[str, tuple] | None = None,
                    expected_model_config: dict | None = None, check_hashes: bool = True) -> Checkpoint:
    """Verify and load rank ``rank``'s part of the checkpoint in ``path``.

    ``world_size``: refuse a checkpoint saved by a different number of ranks. ``expected_shapes``
    (name -> shape): refuse missing, unexpected or differently shaped parameters.
    ``expected_model_config``: refuse a checkpoint whose saved ``meta["config"]["model"]`` differs,
    naming the first differing key.
    """
    path = Path(path)
    meta = read_meta(path)
    if world_size is not None and meta["world_size"] != world_size:
        raise CheckpointError(f"checkpoint file '{path / 'meta.json'}' was saved by "
                              f"{meta['world_size']} ranks, this run has {world_size} (resume "
                              "with the saved parallel layout, or train into a new "
                              "logging.output_dir)")
    if expected_model_config is not None:
        saved = (meta["meta"].get("config") or {}).get("model")
        if saved is not None:
            for key in sorted((set(saved) | set(expected_model_config)) - INIT_ONLY_KEYS
                              - EXECUTION_KEYS):
                if saved.get(key) != expected_model_config.get(key):
                    raise CheckpointError(
                        f"checkpoint file '{path / 'meta.json'}' is for model.{key}={saved.get(key)!r}, "
                        f"this run has model.{key}={expected_model_config.get(key)!r}")
    names = [f"model_rank{rank}.safetensors", f"optim_rank{rank}.safetensors"]
    verify_files(path, meta, check_hashes, names)
    out = []
    for name, expected in zip(names, (expected_shapes, expected_optimizer_shapes)):
        try:
            tensors = load_file(str(path / name))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint file '{path / name}' cannot be read: {exc}") from None
        _check_tensors(path / name, tensors, expected)
        out.append(tensors)
    return Checkpoint(path, int(meta["step"]), out[0], out[1], meta["meta"])


def rotate(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete each ``step_N`` directory (valid or not) behind the newest ``keep_last`` checkpoints
    that verify (sizes and SHA-256, checked newest first); return what was deleted. Anything newer
    than the oldest of those (a damaged newest checkpoint included) stays, and with fewer than
    ``keep_last`` verified checkpoints nothing is deleted."""
    verified, removed = 0, []
    for p in reversed(step_dirs(root)) if keep_last > 0 else []:
        if verified >= keep_last:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif why_invalid(p) is None:
            verified += 1
    return removed


def remove_incomplete(root: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[Path]:
    """Repair, then delete, leftovers of interrupted saves (``step_N.tmp`` / ``step_N.old``);
    return the directories deleted. Call on rank 0 at start-up, before any rank reads ``root``.

    Where ``step_N`` is missing, a ``step_N.tmp`` that verifies (the crash came after its
    ``meta.json``: just before the rename, or between the two renames of a re-save) is published
    as ``step_N``; failing that a ``step_N.old`` that verifies is put back. ``log`` gets one line
    per recovery."""
    root = Path(root)
    if not root.is_dir():
        return []
    junk = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
            and p.suffix in (".tmp", ".old")]
    junk.sort(key=lambda p: (p.stem, p.suffix != ".tmp"))  # per step: the newer save first
    for p in junk:
        final = root / p.stem
        if not final.exists() and why_invalid(p) is None:
            os.replace(p, final)
            _fsync_dir(root)
            (log or _say)(f"recovered checkpoint '{final}' from '{p.name}' (a save was interrupted)")
    removed = [p for p in junk if p.exists()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


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
