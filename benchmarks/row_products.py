"""Micro-benchmark of the decode products (``csrc/row_products.h``) beside NumPy, in one process.

``python benchmarks/row_products.py [--seconds 2] [--rows 1,2,4]`` calls ``SmallMatmulNT`` of the
built kernel library through ctypes (no MindSpore graph) on the benchmark model's shapes: the
output layer ``[m, 512] x [32000, 512]^T`` and a decoder layer's ``qkv`` 768 x 512, ``proj``
512 x 512, ``fc1`` 2816 x 512, ``fc2`` 512 x 1408, alternating with NumPy's ``x @ w.T``
(OpenBLAS sgemv / sgemm) for ``--seconds`` per shape and row count, and prints ms per product
(best and median) and the weight's GB/s. Threads: the product's pool is sized once per process
from ``$MSFORMERS_DECODE_THREADS`` (default: the CPUs), NumPy's from OpenBLAS's variables; run
one process per setting. The layer weights are small enough to stay in the L2 caches between
calls here, which they do not in a decode step (111 MB of weights pass per token): only the
output layer's numbers stand for the step. On a shared machine compare the two columns of one
run, with the load averages it prints.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"output layer": (32000, 512), "qkv": (768, 512), "proj": (512, 512),
          "fc1": (2816, 512), "fc2": (512, 1408)}


def small_matmul(lib: ctypes.CDLL):
    """``y = x w^T`` through ``SmallMatmulNT``'s aot signature (2-D float32 arrays)."""
    def call(x: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
        arrays = (x, w, y)
        dims = [(ctypes.c_int64 * 2)(*a.shape) for a in arrays]
        rc = lib.SmallMatmulNT(3, (ctypes.c_void_p * 3)(*[a.ctypes.data for a in arrays]),
                               (ctypes.c_int * 3)(2, 2, 2),
                               (ctypes.POINTER(ctypes.c_int64) * 3)(*dims),
                               (ctypes.c_char_p * 3)(b"float32", b"float32", b"float32"),
                               None, None)
        if rc != 0:
            raise RuntimeError(f"SmallMatmulNT refused shapes {x.shape} x {w.shape}")
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per shape and row count")
    parser.add_argument("--rows", default="1,2,4", help="rows of x, comma-separated (<= 8)")
    args = parser.parse_args()
    from mcore.fusions.cpu_build import build_cpu_kernels

    ours = small_matmul(ctypes.CDLL(build_cpu_kernels()))
    rng = np.random.default_rng(0)
    print(f"load {os.getloadavg()}, MSFORMERS_DECODE_THREADS="
          f"{os.environ.get('MSFORMERS_DECODE_THREADS', '(CPUs)')}")
    print("| product | rows | NumPy ms best (median) | kernel ms best (median) "
          "| GB/s NumPy / kernel |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        w = rng.standard_normal((n, k)).astype(np.float32)
        for m in (int(r) for r in args.rows.split(",")):
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = np.empty((m, n), np.float32)
            times = {"numpy": [], "kernel": []}
            end = time.perf_counter() + args.seconds
            while time.perf_counter() < end:
                for key in times:  # alternating rounds of 5 calls
                    for _ in range(5):
                        start = time.perf_counter()
                        _ = x @ w.T if key == "numpy" else ours(x, w, y)
                        times[key].append(time.perf_counter() - start)
            np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)
            best = {key: min(t) for key, t in times.items()}
            med = {key: statistics.median(t) for key, t in times.items()}
            gb = n * k * 4 / 1e9
            print(f"| {name} {n} x {k} | {m} | {best['numpy'] * 1e3:.3f} "
                  f"({med['numpy'] * 1e3:.3f}) | {best['kernel'] * 1e3:.3f} "
                  f"({med['kernel'] * 1e3:.3f}) | {gb / best['numpy']:.0f} / "
                  f"{gb / best['kernel']:.0f} |", flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
