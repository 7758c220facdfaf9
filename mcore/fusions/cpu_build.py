"""Build the C++ CPU kernels of ``csrc/`` once per machine and return the shared library path.

``build_cpu_kernels()`` compiles the sources of ``csrc/`` (``cpu_kernels.cc``,
``norm_kernels.cc``, ``attention_kernels.cc``, ``swiglu.cc``, ``cross_entropy.cc``,
``adamw_kernels.cc``, ``small_matmul.cc``, ``decode_layer.cc``, ``moe_permute.cc``, sharing
``common.h``, ``exp.h`` and ``row_math.h``; ``tile_products.h`` for attention,
``row_products.h`` for the decode products) into one library with the machine's C++
compiler (``$CXX``, else ``g++``) at first use.

Flags: ``-O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math`` when the compiler
accepts them, else ``-O3`` alone (a compiler without OpenMP still builds a serial library).
``-fno-trapping-math`` lets GCC turn the clamps of ``exp.h`` into vector selects on CPUs
without mask registers: on an AVX2 machine the cross-entropy's loops stayed scalar without it,
4x slower. It changes no result, only the assumption that a program reads the floating-point
exception flags. Never ``-ffast-math``: loading such a library switches the process to
flush-to-zero for subnormals, and it drops the inf / NaN that non-finite-step detection needs.

Cache: ``$MSFORMERS_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/msformers/kernels``, else
``~/.cache/msformers/kernels`` (never the repository). The file name carries a hash of the
source, the compiler's version line and the flags, so a changed source or compiler builds
anew (every file of ``csrc/`` counts). Several processes (msrun ranks) may build at the same moment: each compiles into its own
temporary file in the cache directory and ``os.replace``-s it onto the final name, an atomic
rename, so a reader sees either no library or a complete one.

Failure (no compiler, a compile error, an unwritable cache) raises ``KernelBuildError`` with
the command and the compiler's message; ``mcore.fusions.registry`` turns it into the composed
fallback. One build per process: the result is memoised.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "cpu_kernels.cc", CSRC / "norm_kernels.cc", CSRC / "attention_kernels.cc",
           CSRC / "swiglu.cc", CSRC / "cross_entropy.cc", CSRC / "adamw_kernels.cc",
           CSRC / "small_matmul.cc", CSRC / "decode_layer.cc", CSRC / "moe_permute.cc")
HEADERS = (CSRC / "common.h", CSRC / "exp.h", CSRC / "row_math.h", CSRC / "tile_products.h",
           CSRC / "row_products.h")  # only hashed
FAST_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
PLAIN_FLAGS = ("-O3",)


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be compiled (message: command and compiler output)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    explicit = os.environ.get("MSFORMERS_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "msformers" / "kernels"


def compiler() -> str:
    """The compiler executable (``$CXX`` or ``g++``); KernelBuildError when it is missing."""
    name = os.environ.get("CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise KernelBuildError(f"no C++ compiler: {name!r} is not on PATH (set CXX or install "
                               "g++; the composed ops are used meanwhile)")
    return path


def _version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def _compile(cxx: str, flags: tuple[str, ...], target: Path,
             sources: tuple[Path, ...] = SOURCES, link: tuple[str, ...] = ()) -> None:
    """Compile ``sources`` into ``target`` (``link``: arguments after the sources, e.g. ``-l``)
    through a temporary file and an atomic rename."""
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *flags, "-shared", "-fPIC", "-o", tmp, *map(str, sources), *link]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if out.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{out.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def build_cpu_kernels() -> str:
    """Path of the compiled kernel library (built now if the cache has none)."""
    cxx = compiler()
    source = b"\0".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelBuildError(f"kernel cache {directory} is not writable: {exc}") from exc
    version = _version(cxx)
    errors = []
    for flags in (FAST_FLAGS, PLAIN_FLAGS):
        key = hashlib.sha256(source + "\0".join((version, *flags)).encode()).hexdigest()[:16]
        target = directory / f"cpu_kernels_{key}.so"
        if target.exists():
            return str(target)
        try:
            _compile(cxx, flags, target)
            return str(target)
        except (KernelBuildError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
    raise KernelBuildError("\n".join(errors))
