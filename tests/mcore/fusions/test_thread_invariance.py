"""Every C++ CPU kernel of mcore.fusions gives the same bits with 1, 2 and 3 OpenMP threads (and
the BLAS matmul backward with 1, 2 and 3 OpenBLAS threads), at sizes above the one-thread
thresholds of ``csrc/common.h``: a multi-rank run, whose ranks get other thread counts than one
process, must not see another rounding. The kernels are called directly through their ``aot``
C signature with numpy buffers (no MindSpore), the thread count set with
``omp_set_num_threads`` of the library's own OpenMP runtime."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from mcore.fusions.blas_build import build_blas_matmul
from mcore.fusions.cpu_build import build_cpu_kernels

THREADS = (1, 2, 3)
# 1056000 values >= kParallelLayerElems (norms, SwiGLU; kParallelElems for the others); 1100
# rows: not a multiple of 32 or 3
ROWS, HIDDEN = 1100, 960


class Kernels:
    """The kernel library through ctypes: ``run(name, inputs, outputs)`` calls the aot entry
    point ``name`` with the arrays (C-contiguous) and fails on a non-zero return."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)

    def run(self, name: str, inputs, outputs) -> None:
        arrays = [np.ascontiguousarray(a) for a in inputs] + list(outputs)
        n = len(arrays)
        dims = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
        fn = getattr(self.lib, name)
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                       ctypes.POINTER(ctypes.c_int),
                       ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)),
                       ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p, ctypes.c_void_p]
        rc = fn(n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]),
                (ctypes.c_int * n)(*[a.ndim for a in arrays]),
                (ctypes.POINTER(ctypes.c_int64) * n)(
                    *[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims]),
                (ctypes.c_char_p * n)(*[str(a.dtype).encode() for a in arrays]), None, None)
        assert rc == 0, f"{name} returned {rc}"


@pytest.fixture(scope="module")
def kernels():
    lib = Kernels(build_cpu_kernels())
    assert hasattr(lib.lib, "omp_set_num_threads"), "the kernels were built without OpenMP"
    return lib


def _empty(*shapes):
    return [np.full(s, np.nan, np.float32) for s in shapes]


def _norm(k, rng):
    x = rng.standard_normal((3, ROWS // 3, HIDDEN)).astype(np.float32)  # [b, s, h]
    w = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    eps = np.array([1e-6], np.float32)
    y, rstd = _empty(x.shape, x.shape[:-1])
    k.run("RmsNormFwd", [x, w, eps], [y, rstd])
    dx, dw = _empty(x.shape, w.shape)
    k.run("RmsNormBwd", [dy, x, w, rstd], [dx, dw])
    return [y, rstd, dx, dw]


def _add_norm(k, rng):
    x, r, dh, dy = (rng.standard_normal((ROWS, HIDDEN)).astype(np.float32) for _ in range(4))
    w = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    eps = np.array([1e-6], np.float32)
    h, y, rstd = _empty(x.shape, x.shape, x.shape[:-1])
    k.run("AddRmsNormFwd", [x, r, w, eps], [h, y, rstd])
    ds, dw = _empty(x.shape, w.shape)
    k.run("AddRmsNormBwd", [dh, dy, h, w, rstd], [ds, dw])
    return [h, y, rstd, ds, dw]


def _swiglu(k, rng):
    y = rng.standard_normal((ROWS, 2 * HIDDEN)).astype(np.float32)
    dout = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    out, dy = _empty((ROWS, HIDDEN), y.shape)
    k.run("SwiGLUFwd", [y], [out])
    k.run("SwiGLUBwd", [dout, y], [dy])
    return [out, dy]


def _rotary(k, rng):
    x = rng.standard_normal((2, 8, 700, 96)).astype(np.float32)  # [b, n, s, d], >= 2^20 values
    angle = rng.uniform(0, 6, (1, 1, 700, 64)).astype(np.float32)  # partial rotary: 64 of 96
    cos, sin = np.cos(angle), np.sin(angle)
    outs = []
    for kind in ("Half", "Interleaved"):
        fwd, bwd = _empty(x.shape, x.shape)
        k.run(f"Rope{kind}Fwd", [x, cos, sin], [fwd])
        k.run(f"Rope{kind}Bwd", [x, cos, sin], [bwd])
        outs += [fwd, bwd]
    return outs


def _attention(k, rng):
    outs = []  # b n s t d >= kParallelMacs; the second: head size 40, 3 query heads per kv head
    for b, n, nkv, s, t, d in ((2, 4, 2, 120, 136, 64), (1, 6, 2, 150, 200, 40)):
        q, dout = (rng.standard_normal((b, n, s, d)).astype(np.float32) for _ in range(2))
        kk, v = (rng.standard_normal((b, nkv, t, d)).astype(np.float32) for _ in range(2))
        scale = np.array([d ** -0.5], np.float32)
        out, lse = _empty(q.shape, q.shape[:-1])
        k.run("AttnCausalFwd", [q, kk, v, scale], [out, lse])
        dq, dk, dv = _empty(q.shape, kk.shape, v.shape)
        k.run("AttnCausalBwd", [dout, q, kk, v, out, lse, scale], [dq, dk, dv])
        outs += [out, lse, dq, dk, dv]
    return outs


def _cross_entropy(k, rng):
    logits = (3 * rng.standard_normal((ROWS, 500))).astype(np.float32)
    labels = rng.integers(-1, 500, ROWS).astype(np.int64)  # -1: ignored rows
    dloss, dlse = (rng.standard_normal(ROWS).astype(np.float32) for _ in range(2))
    loss, lse = _empty((ROWS,), (ROWS,))
    k.run("CrossEntropyFwd", [logits, labels], [loss, lse])
    (grad,) = _empty(logits.shape)
    k.run("CrossEntropyBwd", [logits, labels, lse, dloss, dlse], [grad])
    return [loss, lse, grad]


def _acc_add(k, rng):
    acc = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    g = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    (out,) = _empty((1,))
    k.run("AccAddInPlace", [acc, g], [out])  # acc is written in place
    return [acc]


def _moe_permutation(k, rng):
    E, top = 6, 2
    x = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    experts = rng.integers(0, E + 1, (ROWS, top)).astype(np.int32)  # E: dropped pairs
    N = ROWS * top
    (x_sorted,) = _empty((N, HIDDEN))
    counts, order = np.zeros(E, np.int32), np.zeros(N, np.int32)
    k.run("MoePermuteFwd", [x, experts, np.zeros(E, np.int32)], [x_sorted, counts, order])
    dy_sorted = rng.standard_normal((N, HIDDEN)).astype(np.float32)
    (dx,) = _empty(x.shape)
    k.run("MoePermuteBwd", [dy_sorted, order, x], [dx])
    weights = rng.random((ROWS, top)).astype(np.float32)
    (out,) = _empty(x.shape)
    k.run("MoeUnpermuteFwd", [x_sorted, order, weights], [out])
    dy, dw = _empty((N, HIDDEN), weights.shape)
    k.run("MoeUnpermuteBwd", [dx, x_sorted, order, weights], [dy, dw])
    return [x_sorted, counts.view(np.float32), order.view(np.float32), dx, out, dy, dw]


CASES = {"acc_add": _acc_add, "rms_norm": _norm, "add_rms_norm": _add_norm, "swiglu": _swiglu,
         "rotary": _rotary, "attention": _attention, "cross_entropy": _cross_entropy,
         "moe_permutation": _moe_permutation}


def _run_with_threads(kernels, case) -> list[list[np.ndarray]]:
    """``case``'s outputs (same inputs every time) with each of ``THREADS``."""
    before = kernels.lib.omp_get_max_threads()
    runs = []
    try:
        for threads in THREADS:
            kernels.lib.omp_set_num_threads(threads)
            assert kernels.lib.omp_get_max_threads() == threads
            runs.append(case(kernels, np.random.default_rng(0)))
    finally:
        kernels.lib.omp_set_num_threads(before)
    return runs


@pytest.mark.parametrize("op", sorted(CASES))
def test_same_bits_for_any_thread_count(kernels, op):
    one, *others = _run_with_threads(kernels, CASES[op])
    assert all(np.isfinite(a).all() for a in one if a.dtype == np.float32), "output not written"
    for threads, run in zip(THREADS[1:], others):
        for i, (a, b) in enumerate(zip(one, run)):  # bit patterns: -0.0 != 0.0, NaN == NaN
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32),
                                          err_msg=f"{op} output {i}: 1 vs {threads} threads")


def test_norm_weight_gradient_is_the_rounded_exact_sum(kernels):
    """dw = sum_rows dy x rstd, accumulated in double: within 2 ulp of the float64 sum of the
    same float32 products (a float32 running sum over 1100 rows is off by far more)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    dy = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    w, eps = np.ones(HIDDEN, np.float32), np.array([1e-6], np.float32)
    y, rstd = _empty(x.shape, (ROWS,))
    kernels.run("RmsNormFwd", [x, w, eps], [y, rstd])
    dx, dw = _empty(x.shape, (HIDDEN,))
    kernels.run("RmsNormBwd", [dy, x, w, rstd], [dx, dw])
    exact = (dy * x * rstd[:, None]).astype(np.float64).sum(0)
    np.testing.assert_array_max_ulp(dw, exact.astype(np.float32), maxulp=2)


@pytest.mark.parametrize("m, n, k", [(300, 390, 330), (1024, 96, 520)])
def test_blas_matmul_backward_same_bits_for_any_blas_thread_count(m, n, k):
    """``MatmulNTBwd`` (dw = dy^T x sums over the rows) with 1, 2, 3 threads (1: dx, then dw;
    2 or more: side by side) at m n k >= 2^25, the kernel's kParallelMacs (below it the
    products run one after the other whatever the setting, and the test could not fail)."""
    assert m * n * k >= 1 << 25
    blas = Kernels(build_blas_matmul())
    rng = np.random.default_rng(0)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    before, runs = blas.lib.BlasGetThreads(), []
    try:
        for threads in THREADS:
            blas.lib.BlasSetThreads(threads)
            dx, dw = _empty(x.shape, w.shape)
            blas.run("MatmulNTBwd", [dy, x, w], [dx, dw])
            runs.append((dx.view(np.uint32), dw.view(np.uint32)))
    finally:
        blas.lib.BlasSetThreads(before)
    dx, dw = (a.view(np.float32) for a in runs[0])
    np.testing.assert_allclose(dx, dy @ w, rtol=1e-4, atol=1e-3)  # written, and the products
    np.testing.assert_allclose(dw, dy.T @ x, rtol=1e-4, atol=1e-3)
    for threads, (dx, dw) in zip(THREADS[1:], runs[1:]):
        np.testing.assert_array_equal(runs[0][0], dx, err_msg=f"dx: 1 vs {threads} threads")
        np.testing.assert_array_equal(runs[0][1], dw, err_msg=f"dw: 1 vs {threads} threads")
