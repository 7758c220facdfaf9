"""The registry op "grouped_matmul" (one OpenBLAS product per expert's rows,
``csrc/grouped_matmul.cc``) against the composed ``mcore.moe.grouped_matmul``, forward and the
gradients of ``x`` and ``w``, over counts drawn by hypothesis (experts with no rows, trailing
rows of no expert) in PyNative and under ``mindspore.jit``; its thread setting, its refusal of
bad counts, and ``GroupedMLP``, which takes it by default on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import Tensor, nn  # noqa: E402

from mcore.fusions import blas_build, registry  # noqa: E402
from mcore.fusions.registry import choice, fused_cell  # noqa: E402
from mcore.moe.grouped_matmul import grouped_matmul  # noqa: E402
from tests.mcore.fusions.test_cpu_kernels import assert_agree, tensor  # noqa: E402


class Composed(nn.Cell):
    """The reference with the counts a Tensor (the static form that compiles)."""

    def construct(self, x, w, counts):
        return grouped_matmul(x, w, counts)


def _counts(values):
    return Tensor(np.array(values, np.int32))


@settings(max_examples=15, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=5), extra=st.integers(0, 3),
       n_in=st.integers(1, 9), n_out=st.integers(1, 9), seed=st.integers(0, 99))
def test_matches_the_composed_grouped_matmul(counts, extra, n_in, n_out, seed):
    rng = np.random.default_rng(seed)
    N = max(sum(counts) + extra, 1)
    inputs = (tensor(rng, N, n_in), tensor(rng, len(counts), n_in, n_out), _counts(counts))
    assert_agree(fused_cell("grouped_matmul", True), Composed(), inputs, wrt=(1, 2))


def test_matches_under_jit():
    rng = np.random.default_rng(3)
    inputs = (tensor(rng, 40, 24), tensor(rng, 4, 24, 33), _counts([9, 0, 20, 7]))
    assert_agree(fused_cell("grouped_matmul", True), Composed(), inputs, mode="jit", wrt=(1, 2))


def _run_with(threads: int, x, w, counts, dy):
    library = registry.blas_library()
    cell = fused_cell("grouped_matmul", True)
    try:
        assert blas_build.set_blas_threads(library, threads) == threads
        grads = ms.grad(lambda a, b: (cell(a, b, counts) * dy).sum(), (0, 1))(x, w)
        return [cell(x, w, counts).asnumpy()] + [g.asnumpy() for g in grads]
    finally:
        blas_build.set_blas_threads(library, blas_build.blas_threads())


def test_result_does_not_depend_on_the_thread_setting():
    """Bit for bit with 1 and 2 threads set, above the kernel's size for two threads (2^25
    multiply-adds: the experts then run in two groups, dx beside dw)."""
    rng = np.random.default_rng(5)
    counts = [300, 0, 500, 224]
    x, w, dy = tensor(rng, 1100, 256), tensor(rng, 4, 256, 192), tensor(rng, 1100, 192)
    one = _run_with(1, x, w, _counts(counts), dy)
    two = _run_with(2, x, w, _counts(counts), dy)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    start = np.cumsum([0] + counts)
    xs, ws, dys = x.asnumpy(), w.asnumpy(), dy.asnumpy()
    for e in range(4):
        rows = slice(start[e], start[e + 1])
        np.testing.assert_allclose(two[0][rows], xs[rows] @ ws[e], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(two[2][e], xs[rows].T @ dys[rows], rtol=1e-4, atol=1e-3)
    assert not two[0][start[-1]:].any() and not two[1][start[-1]:].any()  # rows of no expert


@pytest.mark.parametrize("counts", [[3, 2], [-1, 2], [1, 1, 1]])
def test_bad_counts_are_refused(counts):
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError):
        fused_cell("grouped_matmul", True)(tensor(rng, 4, 3), tensor(rng, 2, 3, 5),
                                           _counts(counts)).asnumpy()


def test_grouped_mlp_takes_it_by_default_for_float32(monkeypatch):
    from mcore.moe.experts import GroupedMLP
    from mcore.transformer.config import PrecisionConfig, TransformerConfig

    monkeypatch.setenv(registry.ENV, "auto")
    assert choice("grouped_matmul") == "cpu_kernel"
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               ffn_hidden_size=16)
    kernel, composed = GroupedMLP(config, 6, 3), GroupedMLP(config, 6, 3, fused=False)
    assert kernel.use_kernel and kernel.use_swiglu and not composed.use_kernel
    rng = np.random.default_rng(1)
    x, counts = tensor(rng, 9, 8), [4, 0, 3]
    for form in (counts, _counts(counts)):
        np.testing.assert_allclose(kernel(x, form).asnumpy(), composed(x, form).asnumpy(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        kernel(x, [5, 5, 5])
    half = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                             ffn_hidden_size=16, precision=PrecisionConfig(params_dtype="float16"))
    assert not GroupedMLP(half, 6, 3).use_kernel
    monkeypatch.setenv(registry.ENV, "composed")
    assert choice("grouped_matmul") == "composed" and not GroupedMLP(config, 6, 3).use_kernel
