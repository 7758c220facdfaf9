"""The default corpus: Python's own standard-library sources, found on every machine.

No download and no licence question: the CPython standard library is distributed under the
Python Software Foundation License (PSF-2.0, see ``LICENSE.txt`` in the stdlib directory), which
permits use, copying and derivative works; we only read the files at run time and ship none of
them. ``default_corpus_files()`` picks a deterministic subset: the ``*.py`` files under
``sysconfig.get_paths()["stdlib"]`` sorted by relative path, skipping tests, third-party
packages, generated tables and files over ``max_file_bytes``, until ``max_bytes`` is reached.
The subset is the same on every run of the same Python version (it is recorded, with its total
size, in the dataset's ``.json`` sidecar by ``pipeline.py``).
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from training.errors import DataError

# Directories that are tests, vendored third-party code, or generated data rather than prose-like code.
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "idlelib",
    "pydoc_data", "lib2to3", "distutils", "ensurepip", "turtledemo", "__pycache__",
})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(root: Path):
    """``*.py`` files under ``root`` outside ``EXCLUDED_DIRS`` (at any depth) and outside the
    top-level ``config-*`` entries. The walk never enters an excluded directory: a Python's
    stdlib directory holds its ``site-packages``, often tens of thousands of files (an
    ``rglob`` that filtered afterwards took ~1 s of every run's start)."""
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = [d for d in dirnames
                       if d not in EXCLUDED_DIRS and not (top and d.startswith("config-"))]
        for name in filenames:
            if name.endswith(".py") and not (top and name.startswith("config-")):
                yield Path(dirpath, name)


def default_corpus_files(max_bytes: int = 4_000_000, max_file_bytes: int = 150_000,
                         root: str | os.PathLike | None = None) -> list[Path]:
    """Deterministic list of standard-library source files totalling at most ``max_bytes``."""
    root = Path(root) if root is not None else stdlib_root()
    candidates = sorted(_stdlib_sources(root), key=lambda p: p.relative_to(root).as_posix())
    files, total = [], 0
    for p in candidates:
        size = p.stat().st_size
        if size == 0 or size > max_file_bytes or total + size > max_bytes:
            continue
        files.append(p)
        total += size
    if not files:
        raise DataError(f"data.corpus='stdlib': no Python sources found under '{root}'")
    return files


def corpus_files(corpus: str, max_bytes: int = 4_000_000) -> list[Path]:
    """Resolve ``data.corpus``: ``'stdlib'``, a text file, or a directory (all files, sorted);
    ``DataError`` naming the key if there is nothing to read."""
    if corpus == "stdlib":
        return default_corpus_files(max_bytes)
    path = Path(corpus)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.relative_to(path).as_posix())
        if files:
            return files
        raise DataError(f"data.corpus='{corpus}': the directory holds no files")
    raise DataError(f"data.corpus='{corpus}': no such file or directory (use 'stdlib', a text "
                    "file or a directory of text files)")


def read_document(path: str | os.PathLike) -> str:
    """One file = one document; undecodable bytes are replaced rather than failing the run."""
    return Path(path).read_text(encoding="utf-8", errors="replace")
