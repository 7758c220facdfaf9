"""Build the BLAS kernels (``csrc/blas_matmul.cc``, ``csrc/grouped_matmul.cc``) against the
OpenBLAS of the pip package ``scipy-openblas32`` and set their thread count.

``build_blas_matmul()`` returns the path of a shared library exporting ``MatmulNTBwd`` (the
backward of ``x w^T``) and ``GroupedMatmulFwd`` / ``GroupedMatmulBwd`` (the experts' grouped
matmul), ``ops.Custom(func_type="aot")`` entry points, linked to
``libscipy_openblas.so`` with an rpath to it, so neither a system BLAS nor ``LD_LIBRARY_PATH`` is
needed. The headers and the library come from the package (``get_include_dir``,
``get_lib_dir``); its symbols carry the prefix ``scipy_`` and cannot clash with NumPy's or
MindSpore's own BLAS. Compiler, cache directory and atomic publication are those of
``cpu_build`` (the file name hashes the sources, the compiler, the flags and the OpenBLAS
version). Flags: ``-O2`` (the kernel only forwards to sgemm) and ``-pthread``.

Failure (the package is not installed, no compiler, a compile error) raises
``KernelBuildError``; ``mcore.fusions.registry`` then uses the composed ops (``ops.MatMul``,
``mcore.moe.grouped_matmul``).

Threads: ``blas_threads()`` reads ``$MSFORMERS_BLAS_THREADS`` (default: the CPUs this process
may run on) and ``set_blas_threads`` hands it to the library's ``BlasSetThreads``. OpenBLAS
itself always runs one thread; with 2 or more the backward of a product of at least 2^25
multiply-adds computes ``dx`` and ``dw`` at the same time on two threads (csrc/blas_matmul.cc
says why; the grouped matmul splits its experts the same way, csrc/grouped_matmul.cc), so the
results do not depend on the setting (docs/fusions.md, "The BLAS matmul").
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
from pathlib import Path

from mcore.fusions.cpu_build import KernelBuildError, _compile, _version, cache_dir, compiler

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "blas_matmul.cc", CSRC / "grouped_matmul.cc")
HEADERS = (CSRC / "blas_gemm.h",)
FLAGS = ("-O2", "-pthread")  # -pthread: std::thread
THREADS_ENV = "MSFORMERS_BLAS_THREADS"


def openblas() -> tuple[str, str, str]:
    """(include dir, library dir, version) of scipy-openblas32; KernelBuildError when absent."""
    try:
        import scipy_openblas32 as pkg
    except ImportError as exc:
        raise KernelBuildError("the pip package scipy-openblas32 is not installed "
                               "(pip install -e .; the composed matmul is used meanwhile)") from exc
    return pkg.get_include_dir(), pkg.get_lib_dir(), pkg.__version__


@functools.lru_cache(maxsize=None)
def build_blas_matmul() -> str:
    """Path of the compiled BLAS matmul library (built now if the cache has none)."""
    include, libdir, version = openblas()
    cxx = compiler()
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelBuildError(f"kernel cache {directory} is not writable: {exc}") from exc
    flags = (*FLAGS, f"-I{include}")
    link = (f"-L{libdir}", "-lscipy_openblas", f"-Wl,-rpath,{libdir}")
    key_text = "\0".join((_version(cxx), *flags, *link, version))
    source = b"\0".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + key_text.encode()).hexdigest()[:16]
    target = directory / f"blas_matmul_{key}.so"
    if not target.exists():
        try:
            _compile(cxx, flags, target, SOURCES, link)
        except subprocess.TimeoutExpired as exc:
            names = ", ".join(p.name for p in SOURCES)
            raise KernelBuildError(f"compiling {names} timed out") from exc
    return str(target)


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is
    none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def blas_threads() -> int:
    """``$MSFORMERS_BLAS_THREADS`` (default ``default_threads()``); ValueError naming the variable
    when bad."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return default_threads()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer")
    return int(raw)


def set_blas_threads(library: str, threads: int) -> int:
    """Let the backward kernel use ``threads`` threads; returns the count it reports.
    (MindSpore loads the same file for the custom ops, so this is the instance they use.)"""
    lib = ctypes.CDLL(library)
    lib.BlasSetThreads(int(threads))
    return int(lib.BlasGetThreads())
