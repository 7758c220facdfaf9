"""The exp of the CPU kernels (``csrc/exp.h``: a polynomial that vectorises, used by the
cross-entropy and SwiGLU kernels) against the float64 exp, and the cross-entropy kernel's loss
and log-sum-exp at a real vocabulary size against a float64 log-softmax. Called through the
kernels' C signature (``Kernels`` of test_thread_invariance), no MindSpore; ~1 s."""
from __future__ import annotations

import numpy as np
import pytest

from mcore.fusions.cpu_build import build_cpu_kernels
from tests.mcore.fusions.test_thread_invariance import Kernels

SMALLEST_NORMAL = np.finfo(np.float32).tiny


@pytest.fixture(scope="module")
def kernels():
    return Kernels(build_cpu_kernels())


def kernel_exp(kernels, x: np.ndarray) -> np.ndarray:
    """exp(x) as the kernels compute it: the cross-entropy backward with lse = 0, dlse = 1 and
    every row ignored writes ``exp(z - 0) * 1`` for each logit z."""
    z = x.reshape(1, -1).astype(np.float32)
    zeros, ones = np.zeros(1, np.float32), np.ones(1, np.float32)
    grad = np.full(z.shape, np.nan, np.float32)
    kernels.run("CrossEntropyBwd", [z, np.array([-1], np.int64), zeros, zeros, ones], [grad])
    return grad[0]


def test_exp_within_1_2_ulp_where_the_result_is_normal(kernels):
    """Measured: 0.94 ulp over every float32 with fused multiply-adds (``-march=native`` on an
    FMA CPU, the default build), 1.15 ulp on a sample without them (``-O3`` alone)."""
    x = np.linspace(-87.3, 88.7, 2_000_003, dtype=np.float32)  # exp(x) normal, finite
    x = np.concatenate([x, np.float32(-1e-3) * np.arange(1000, dtype=np.float32)])  # near 0
    exact = np.exp(x.astype(np.float64))
    assert (exact >= SMALLEST_NORMAL).all()
    got = kernel_exp(kernels, x).astype(np.float64)
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)  # of the rounded result
    assert (np.abs(got - exact) / ulp).max() < 1.2


def test_exp_subnormal_overflow_and_special_values(kernels):
    x = np.linspace(-103.9, -87.4, 100_001, dtype=np.float32)  # subnormal results
    got = kernel_exp(kernels, x)
    assert (got > 0).all(), "subnormal results flushed to zero"
    tiny_step = np.float32(2.0 ** -149)
    np.testing.assert_array_less(np.abs(got.astype(np.float64) - np.exp(x.astype(np.float64))),
                                 1.0001 * tiny_step)
    special = np.array([-np.inf, -1e4, -104.0, 0.0, -0.0, 88.73, 1e4, np.inf, np.nan], np.float32)
    got = kernel_exp(kernels, special)
    np.testing.assert_array_equal(got[:3], 0.0)
    np.testing.assert_array_equal(got[3:5], 1.0)
    assert np.isposinf(got[5:8]).all() and np.isnan(got[8])


def test_cross_entropy_at_vocabulary_size_against_float64(kernels):
    """[6, 32000] logits, one with a huge range: loss and lse within 2e-7 relative (+1e-6)."""
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((6, 32000)) * np.array([[0.1], [1], [3], [10], [30], [100]]))
    z = z.astype(np.float32)
    labels = rng.integers(0, 32000, 6).astype(np.int32)
    loss, lse = np.full(6, np.nan, np.float32), np.full(6, np.nan, np.float32)
    kernels.run("CrossEntropyFwd", [z, labels], [loss, lse])
    z64 = z.astype(np.float64)
    m = z64.max(1)
    want_lse = m + np.log(np.exp(z64 - m[:, None]).sum(1))
    want_loss = want_lse - z64[np.arange(6), labels]
    np.testing.assert_allclose(lse, want_lse, rtol=2e-7, atol=1e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-7, atol=1e-6)
