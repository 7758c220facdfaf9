"""The registry op "matmul" (OpenBLAS sgemm, ``csrc/blas_matmul.cc``) against
``ops.MatMul(transpose_b=True)``, forward and both gradients, over shapes drawn by hypothesis in
PyNative and on fixed odd shapes under ``mindspore.jit``; its default, its thread setting, its
fallback when OpenBLAS cannot be had, and the linear layers that take it. CI has g++ and the
pinned scipy-openblas32."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import nn, ops  # noqa: E402

from mcore.fusions import blas_build, registry  # noqa: E402
from mcore.fusions.registry import choice, fused_cell  # noqa: E402
from mcore.parallel_state import ProcessGroup  # noqa: E402
from mcore.tensor_parallel.layers import ColumnParallelLinear  # noqa: E402
from tests.mcore.fusions.test_cpu_kernels import assert_agree, tensor  # noqa: E402


@pytest.fixture
def fresh_blas():
    """Forget the memoised BLAS library before and after (the test changes the environment)."""
    blas_build.build_blas_matmul.cache_clear()
    registry.blas_library.cache_clear()
    yield
    blas_build.build_blas_matmul.cache_clear()
    registry.blas_library.cache_clear()


def test_on_by_default_on_cpu_only(monkeypatch):
    monkeypatch.setenv(registry.ENV, "auto")
    assert registry.REGISTRY["matmul"].cpu_by_default
    assert choice("matmul") == "cpu_kernel"
    assert choice("swiglu") == "cpu_kernel"  # like the other CPU kernels
    assert choice("matmul", device="Ascend") == "composed"
    monkeypatch.setenv(registry.ENV, "composed")
    assert choice("matmul") == "composed" and fused_cell("matmul") is None


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 40), seed=st.integers(0, 99))
def test_matches_ops_matmul(m, k, n, seed):
    rng = np.random.default_rng(seed)
    assert_agree(fused_cell("matmul", True), ops.MatMul(transpose_b=True),
                 (tensor(rng, m, k), tensor(rng, n, k)))


def test_matches_ops_matmul_under_jit():
    rng = np.random.default_rng(1)
    assert_agree(fused_cell("matmul", True), ops.MatMul(transpose_b=True),
                 (tensor(rng, 67, 129), tensor(rng, 33, 129)), mode="jit")


def test_backward_kernel_against_numpy_and_used_by_the_gradient():
    rng = np.random.default_rng(2)
    x, w, dy = tensor(rng, 5, 0), tensor(rng, 3, 0), tensor(rng, 5, 3)  # k = 0: empty sums
    dx, dw = fused_cell("matmul", True).backward(dy, x, w)
    assert dx.shape == (5, 0) and dw.shape == (3, 0)
    x, w, dy = tensor(rng, 9, 7), tensor(rng, 4, 7), tensor(rng, 9, 4)
    dx, dw = fused_cell("matmul", True).backward(dy, x, w)
    np.testing.assert_allclose(dx.asnumpy(), dy.asnumpy() @ w.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw.asnumpy(), dy.asnumpy().T @ x.asnumpy(), rtol=1e-5, atol=1e-5)
    cell = fused_cell("matmul", True)
    grads = ms.grad(lambda a, b: ops.sum(cell(a, b) * dy), (0, 1))(x, w)
    np.testing.assert_allclose(grads[1].asnumpy(), dw.asnumpy(), rtol=1e-6)
    cell.backward = _Zeros()  # the gradient comes from cell.backward, not MatMul's own bprop
    grads = ms.grad(lambda a, b: ops.sum(cell(a, b) * dy), (0, 1))(x, w)
    assert not np.any(grads[0].asnumpy()) and not np.any(grads[1].asnumpy())


class _Zeros(nn.Cell):
    def construct(self, dy, x, w):
        return ops.zeros_like(x), ops.zeros_like(w)


def test_threads_setting(monkeypatch):
    monkeypatch.setenv(blas_build.THREADS_ENV, "0")
    with pytest.raises(ValueError, match=blas_build.THREADS_ENV):
        blas_build.blas_threads()
    monkeypatch.setenv(blas_build.THREADS_ENV, "3")
    assert blas_build.blas_threads() == 3
    monkeypatch.delenv(blas_build.THREADS_ENV)
    assert blas_build.blas_threads() == blas_build.default_threads() >= 1
    library = registry.blas_library()
    assert blas_build.set_blas_threads(library, 2) == 2
    assert blas_build.set_blas_threads(library, 1) == 1
    blas_build.set_blas_threads(library, blas_build.blas_threads())


def _backward_with(threads: int, *inputs):
    library = registry.blas_library()
    try:
        assert blas_build.set_blas_threads(library, threads) == threads
        return [g.asnumpy() for g in fused_cell("matmul", True).backward(*inputs)]
    finally:
        blas_build.set_blas_threads(library, blas_build.blas_threads())


def test_result_does_not_depend_on_the_thread_setting():
    """Bit for bit with 1 and 2 threads set, on a product above the kernel's size for two
    threads (2^25 multiply-adds: dx and dw then run at the same time, each on one OpenBLAS
    thread). OpenBLAS's own two threads would change ~80 % of dx's bits at this shape."""
    rng = np.random.default_rng(5)
    x, w, dy = tensor(rng, 512, 256), tensor(rng, 520, 256), tensor(rng, 512, 520)  # 68M MACs
    one, two = _backward_with(1, dy, x, w), _backward_with(2, dy, x, w)
    exact = (dy.asnumpy().astype(np.float64) @ w.asnumpy(), dy.asnumpy().T.astype(np.float64) @ x.asnumpy())
    for a, b, want in zip(one, two, exact):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(b, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("broken", ["package", "compiler"])
def test_without_openblas_the_layers_use_ops_matmul(broken, fresh_blas, monkeypatch, tmp_path):
    monkeypatch.setenv(registry.ENV, "auto")
    monkeypatch.setenv("MSFORMERS_KERNEL_CACHE", str(tmp_path / "cache"))
    if broken == "package":
        monkeypatch.setitem(sys.modules, "scipy_openblas32", None)  # import fails
        message = "scipy-openblas32 is not installed"
    else:
        monkeypatch.setenv("CXX", "no-such-compiler-xyz")
        message = "no C\\+\\+ compiler"
    with pytest.raises(registry.KernelBuildError, match=message):
        blas_build.build_blas_matmul()
    with pytest.warns(RuntimeWarning, match="BLAS matmul unavailable"):
        assert choice("matmul") == "composed"
    layer = ColumnParallelLinear(6, 4, ProcessGroup.single(), bias=False, name="nb")
    assert layer.blas is None
    x = tensor(np.random.default_rng(0), 3, 6)
    np.testing.assert_allclose(layer(x).asnumpy(), x.asnumpy() @ layer.weight.asnumpy().T,
                               rtol=1e-5, atol=1e-6)


def test_layers_take_it_for_float32_only(monkeypatch):
    monkeypatch.setenv(registry.ENV, "auto")
    group = ProcessGroup.single()
    fp32 = ColumnParallelLinear(6, 4, group, bias=True, name="a")
    fp16 = ColumnParallelLinear(6, 4, group, bias=True, name="b", params_dtype=ms.float16)
    assert fp32.blas is not None and fp16.blas is None
    x = tensor(np.random.default_rng(0), 2, 3, 6)  # [b, s, h]: the layer flattens the rows
    expected = x.asnumpy() @ fp32.weight.asnumpy().T + fp32.bias.asnumpy()
    np.testing.assert_allclose(fp32(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    # a float16 input to a float32 layer takes ops.MatMul (the kernel is float32 only)
    assert fp32.product(x.astype(ms.float16).reshape((6, 6)),
                        fp32.weight.astype(ms.float16)).dtype == ms.float16


def test_float16_inputs_take_mindspore_matmuls_both_ways():
    """``Cell.to_float(float16)`` on a layer casts the kernel cell's inputs too (mixed
    precision): the float32-only sgemm must not see them."""
    rng = np.random.default_rng(3)
    x, w, probe = tensor(rng, 6, 5), tensor(rng, 4, 5), tensor(rng, 6, 4)
    results = []
    for cell in (fused_cell("matmul", True).to_float(ms.float16), _Half()):
        out = cell(x, w)
        grads = ms.grad(lambda a, b: ops.sum(cell(a, b).astype(ms.float32) * probe), (0, 1))(x, w)
        results.append([out.asnumpy(), *(g.asnumpy() for g in grads)])
    assert results[0][0].dtype == np.float16
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # fp16 rounding


class _Half(nn.Cell):
    def construct(self, x, w):
        return ops.MatMul(transpose_b=True)(x.astype(ms.float16), w.astype(ms.float16))
