"""The registry ops "moe_permute" and "moe_unpermute" (``csrc/moe_permute.cc``) against the
composed ``permute`` / ``unpermute`` of ``mcore.moe.permute``: the same order and counts, the
same rows, the same gradients, over routings drawn by hypothesis (dropped pairs, experts with
no pairs) in PyNative and under ``mindspore.jit``; their refusal of bad routings and orders,
and ``Permutation``, which the dispatchers build."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import Tensor, nn  # noqa: E402

from mcore.fusions import registry  # noqa: E402
from mcore.fusions.registry import choice, fused_cell  # noqa: E402
from mcore.moe.permute import Permutation, permute, unpermute  # noqa: E402
from tests.ms_helpers import compiler  # noqa: E402


@st.composite
def routings(draw):
    T, k, E = draw(st.integers(1, 12)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
    experts = draw(st.lists(st.integers(0, E), min_size=T * k, max_size=T * k))  # E: dropped
    return np.array(experts, np.int32).reshape(T, k), E, draw(st.integers(1, 9)), draw(
        st.integers(0, 99))


class Sorted(nn.Cell):
    """``sum(x_sorted * probe)`` of a permutation (kernel or composed)."""

    def __init__(self, kernel, num_experts):
        super().__init__()
        self.kernel, self.num_experts = kernel, num_experts

    def construct(self, x, experts, probe):
        if self.kernel is None:
            return (permute(x, experts, self.num_experts)[0] * probe).sum()
        return (self.kernel(x, experts)[0] * probe).sum()


class Combined(nn.Cell):
    """``sum(unpermute(y, order, weights) * probe)`` (kernel or composed)."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def construct(self, y, order, weights, probe):
        if self.kernel is None:
            return (unpermute(y, order, weights) * probe).sum()
        out = self.kernel(y, order, weights)
        return (out * probe).sum()


def _check(case, mode):
    experts, E, h, seed = case
    T, k = experts.shape
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal((T, h)).astype(np.float32))
    route = Tensor(experts)
    kernel = fused_cell("moe_permute", True, num_experts=E)
    got, want = compiler(mode)(kernel)(x, route), permute(x, route, E)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    assert got[1].dtype == ms.int32 and got[2].dtype == ms.int32
    probe = Tensor(rng.standard_normal((T * k, h)).astype(np.float32))
    grads = [compiler(mode)(ms.grad(Sorted(c, E), 0))(x, route, probe).asnumpy()
             for c in (kernel, None)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)

    order = want[2]
    y = Tensor(rng.standard_normal((T * k, h)).astype(np.float32))
    weights = Tensor(rng.random((T, k)).astype(np.float32))
    unkernel = fused_cell("moe_unpermute", True)
    np.testing.assert_allclose(compiler(mode)(unkernel)(y, order, weights).asnumpy(),
                               unpermute(y, order, weights).asnumpy(), rtol=1e-5, atol=1e-6)
    probe = Tensor(rng.standard_normal((T, h)).astype(np.float32))
    grads = [compiler(mode)(ms.grad(Combined(c), (0, 2)))(y, order, weights, probe)
             for c in (unkernel, None)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(routings())
def test_match_the_composed_permutation(case):
    _check(case, "pynative")


def test_match_under_jit():
    experts = np.array([[2, 0], [3, 2], [0, 3], [1, 2], [3, 3]], np.int32)  # 3 = dropped
    _check((experts, 3, 6, 4), "jit")


def test_expert_counts_differ_with_the_same_input_shapes():
    """MindSpore keeps one shape function per kernel (and caches shapes per input shapes):
    two permutations of the same tokens for 3 and 5 experts each get their own counts."""
    x, route = Tensor(np.ones((4, 2), np.float32)), Tensor(np.array([[0], [2], [3], [1]], np.int32))
    three = fused_cell("moe_permute", True, num_experts=3)(x, route)[1]
    five = fused_cell("moe_permute", True, num_experts=5)(x, route)[1]
    assert three.asnumpy().tolist() == [1, 1, 1] and five.asnumpy().tolist() == [1, 1, 1, 1, 0]


def test_bad_routings_and_orders_are_refused():
    x = Tensor(np.ones((2, 3), np.float32))
    with pytest.raises(RuntimeError):  # expert id past E (dropped is E itself)
        fused_cell("moe_permute", True, num_experts=2)(x, Tensor(np.array([[0], [3]], np.int32)))
    y, weights = Tensor(np.ones((2, 3), np.float32)), Tensor(np.ones((2, 1), np.float32))
    with pytest.raises(RuntimeError):  # not a permutation of [0, 2)
        fused_cell("moe_unpermute", True)(y, Tensor(np.array([1, 1], np.int32)), weights).asnumpy()


def test_permutation_takes_the_kernels_for_float32(monkeypatch):
    monkeypatch.setenv(registry.ENV, "auto")
    assert choice("moe_permute") == choice("moe_unpermute") == "cpu_kernel"
    both = Permutation(3)
    assert both.use_permute_kernel and both.use_unpermute_kernel
    plain = Permutation(3, fused=False)
    assert not (plain.use_permute_kernel or plain.use_unpermute_kernel)
    rng = np.random.default_rng(0)
    route = Tensor(np.array([[2, 0], [3, 1], [1, 2]], np.int32))
    for dtype in (ms.float32, ms.float16):  # float16 rows take the composed ops
        x = Tensor(rng.standard_normal((3, 4)), dtype)
        got, want = both.permute(x, route), plain.permute(x, route)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
        weights = Tensor(rng.random((3, 2)).astype(np.float32))
        np.testing.assert_allclose(both.unpermute(got[0], got[2], weights).asnumpy(),
                                   plain.unpermute(want[0], want[2], weights).asnumpy(),
                                   rtol=1e-3)
    monkeypatch.setenv(registry.ENV, "composed")
    assert not Permutation(3).use_permute_kernel
