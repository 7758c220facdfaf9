"""Checkpoint directories under a root: listing, verification, auto-resume choice, rotation and
the repair of interrupted saves (``step_N.tmp`` / ``step_N.old``, see ``mcore.checkpoint.save``)."""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from mcore.checkpoint.metadata import META, CheckpointError, fsync_dir, verify_files

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """Every ``step_N`` directory under ``root`` (with or without ``meta.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint directories (``step_N`` with a ``meta.json``), oldest first."""
    return [p for p in step_dirs(root) if (p / META).is_file()]


def why_invalid(path: str | os.PathLike, check_hashes: bool = True) -> str | None:
    """Why the checkpoint in ``path`` cannot be used (a ``CheckpointError`` message), or ``None``."""
    try:
        verify_files(path, check_hashes=check_hashes)
        return None
    except CheckpointError as exc:
        return str(exc)


def is_valid(path: str | os.PathLike, check_hashes: bool = False) -> bool:
    return why_invalid(path, check_hashes) is None


def scan(root, check_hashes: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest checkpoint that verifies or None, [(newer checkpoint, why it fails), ...])``."""
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
    ``log`` with one line per newer checkpoint it skips and raises ``CheckpointError`` when
    checkpoints exist but none verifies."""
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


def rotate(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete each ``step_N`` directory behind the newest ``keep_last`` checkpoints that verify
    (checked newest first); return what was deleted. Anything newer than the oldest of those (a
    damaged newest checkpoint included) stays; with fewer verified ones nothing is deleted."""
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
    return the directories deleted. Call on one rank at start-up, before any rank reads ``root``.
    Where ``step_N`` is missing, a ``step_N.tmp`` that verifies (the crash came after its
    ``meta.json``) is published as ``step_N``; failing that a ``step_N.old`` that verifies is
    put back. ``log`` gets one line per recovery."""
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
            fsync_dir(root)
            (log or _say)(f"recovered checkpoint '{final}' from '{p.name}' (a save was interrupted)")
    removed = [p for p in junk if p.exists()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
