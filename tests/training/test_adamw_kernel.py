"""The fused optimizer update (registry ops ``adamw`` and ``squared_norm``, CPU kernels on by
default) against the composed reference (``ops.AdamWeightDecay`` after an in-place clip, and
``(g * g).sum()``): weights, moments, zeroed buffers and the norm over several steps with the
clip active and a decay mask, in PyNative and under ``mindspore.jit``; the norm against numpy,
the same bits with one OpenMP thread as with two."""
from __future__ import annotations

import types

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import Parameter, ParameterTuple, Tensor  # noqa: E402

from mcore.distributed.finalize import grad_plans  # noqa: E402
from mcore.fusions import registry  # noqa: E402
from mcore.parallel_state import ParallelDims  # noqa: E402
from tests.fresh_process import run_python  # noqa: E402
from training.adamw import AdamWUpdate  # noqa: E402
from training.step import assign_in_place  # noqa: E402

# (shape, decay): a matrix above the kernels' one-thread limit (2^16 elements), odd shapes, a scalar
SHAPES = [((300, 250), True), ((7, 3), True), ((5,), False), ((1,), False)]
OPT = types.SimpleNamespace(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_grad=1.0)


def _update(seed: int):
    rng = np.random.default_rng(seed)
    params = ParameterTuple([Parameter(Tensor(rng.standard_normal(s).astype(np.float32)),
                                       name=f"p{i}") for i, (s, _) in enumerate(SHAPES)])
    acc = ParameterTuple([Parameter(Tensor(np.zeros(s, np.float32)), name=f"acc{i}",
                                    requires_grad=False) for i, (s, _) in enumerate(SHAPES)])
    plans = grad_plans([(p.name, p) for p in params], set(), ParallelDims.single())
    return params, acc, AdamWUpdate(params, acc, [d for _, d in SHAPES], plans,
                                    ParallelDims.single(), OPT)


def _run(monkeypatch, mode: str, jit: bool, steps: int = 3):
    """Weights, moments, buffers and norms after ``steps`` updates with ``$MSFORMERS_FUSIONS``
    = ``mode`` (same gradients every time)."""
    monkeypatch.setenv(registry.ENV, mode)
    params, acc, update = _update(0)
    assert update.fused == (mode == "auto")
    if jit:
        update.jit()
    rng, norms = np.random.default_rng(1), []
    for t in range(1, steps + 1):
        for a in acc:  # |g| ~ 5 x sqrt(75000): the clip (1.0) is active; written in place
            assign_in_place(a, (5 * rng.standard_normal(a.shape)).astype(np.float32))
        bc1, bc2 = 1 - OPT.beta1 ** t, 1 - OPT.beta2 ** t
        norm, _ = update(*(Tensor(x, ms.float32) for x in (1e-2, bc1, bc2, 2.5)))
        norms.append(float(norm.asnumpy()))
    return ([p.asnumpy() for p in params], [m.asnumpy() for m in update.m],
            [v.asnumpy() for v in update.v], [a.asnumpy() for a in acc], norms)


@pytest.mark.parametrize("jit", [False, True])
def test_kernel_update_matches_composed(monkeypatch, jit):
    fused = _run(monkeypatch, "auto", jit)
    composed = _run(monkeypatch, "composed", jit)
    for name, f, c in zip(("weights", "m", "v"), fused[:3], composed[:3]):
        for i, (a, b) in enumerate(zip(f, c)):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7, err_msg=f"{name}[{i}]")
    assert all(not a.any() for a in fused[3]), "the kernel zeroes the gradient buffers"
    np.testing.assert_allclose(fused[4], composed[4], rtol=1e-6)
    assert fused[4][0] > 10 * OPT.clip_grad  # the clip factor took part


def test_skipped_step_leaves_weights_and_moments(monkeypatch):
    monkeypatch.setenv(registry.ENV, "auto")
    params, acc, update = _update(0)
    before = [p.asnumpy().copy() for p in params]
    acc[0].set_data(Tensor(np.full(acc[0].shape, np.inf, np.float32)))
    norm, _ = update(*(Tensor(x, ms.float32) for x in (1e-2, 0.1, 0.05, 2.5)))
    assert not np.isfinite(norm.asnumpy())
    for b, p, m, a in zip(before, params, update.m, acc):
        np.testing.assert_array_equal(p.asnumpy(), b)
        assert not m.asnumpy().any() and not a.asnumpy().any()


NORM_CODE = """
import ctypes, numpy as np, mindspore as ms
ms.set_device("CPU")
from mcore.fusions.registry import fused_cell
g = np.random.default_rng(3).standard_normal({n}).astype(np.float32)
out = fused_cell("squared_norm", fused=True)(ms.Tensor(g)).asnumpy().tobytes().hex()
print("threads", ctypes.CDLL("libgomp.so.1").omp_get_max_threads())
print("norm", out)
"""


def test_squared_norm_matches_numpy_and_ignores_thread_count(monkeypatch):
    monkeypatch.setenv(registry.ENV, "auto")
    cell = registry.fused_cell("squared_norm", fused=True)
    rng = np.random.default_rng(3)
    for n in (1, 1000, (1 << 14) + 3, 200_001):
        g = rng.standard_normal(n).astype(np.float32)
        want = np.sum(g.astype(np.float64) ** 2)
        np.testing.assert_allclose(float(cell(Tensor(g)).asnumpy()), want, rtol=1e-7)
    bits = []
    for threads in ("1", "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        res = run_python(NORM_CODE.format(n=200_001))
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"threads {threads}" in res.stdout, res.stdout  # the kernel ran on that many
        bits.append([ln for ln in res.stdout.splitlines() if ln.startswith("norm")])
    assert bits[0] == bits[1] and bits[0], bits
