"""permute / unpermute / capacity padding and both dispatchers at ep=1 (single process).
The 2-rank checks live in test_moe_multirank.py."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routings(draw):
    """A random routing with distinct experts per token, some pairs dropped (id E)."""
    T, E = draw(st.integers(1, 7)), draw(st.integers(1, 6))
    k = draw(st.integers(1, E))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    drop = rng.random((T, k)) < draw(st.sampled_from([0.0, 0.3]))
    experts[drop] = E
    weights = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    weights[drop] = 0.0
    x = rng.standard_normal((T, 3)).astype(np.float32)
    return x, experts, weights, E


@SETTINGS
@given(routings())
def test_permute_groups_rows_by_expert_then_token(case):
    import mindspore as ms

    from mcore.moe.permute import permute, unpermute

    x, experts, weights, E = case
    T, k = experts.shape
    x_sorted, counts, order = permute(ms.Tensor(x), ms.Tensor(experts), E)
    pairs = sorted(range(T * k), key=lambda p: (experts.reshape(-1)[p], p))
    np.testing.assert_array_equal(order.asnumpy(), pairs)
    np.testing.assert_array_equal(x_sorted.asnumpy(), x[np.array(pairs) // k])
    np.testing.assert_array_equal(counts.asnumpy(), np.bincount(experts.reshape(-1),
                                                                minlength=E + 1)[:E])
    # experts that scale rows by (expert + 1): unpermute = sum_j w * (e + 1) * x
    scale = np.array([experts.reshape(-1)[p] + 1.0 for p in pairs], np.float32)[:, None]
    y = unpermute(x_sorted * ms.Tensor(scale), order, ms.Tensor(weights)).asnumpy()
    expect = ((weights * (experts + 1.0) * (experts < E))[..., None] * x[:, None, :]).sum(1)
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(routings(), st.integers(0, 3))
def test_pad_to_capacity_round_trip(case, spare):
    import mindspore as ms

    from mcore.moe.permute import pad_to_capacity, permute, unpad_from_capacity

    x, experts, weights, E = case
    x_sorted, counts, _ = permute(ms.Tensor(x), ms.Tensor(experts), E)
    c = counts.asnumpy()
    C = int(c.max()) + spare if c.max() + spare > 0 else 1
    padded = pad_to_capacity(x_sorted, counts, C).asnumpy().reshape(E, C, -1)
    rows = x_sorted.asnumpy()
    start = 0
    for e in range(E):
        np.testing.assert_array_equal(padded[e, :c[e]], rows[start:start + c[e]])
        assert (padded[e, c[e]:] == 0).all()
        start += c[e]
    back = unpad_from_capacity(ms.Tensor(padded.reshape(E * C, -1)), counts, C, rows.shape[0])
    expect = rows.copy()
    expect[c.sum():] = 0
    np.testing.assert_array_equal(back.asnumpy(), expect)


@pytest.mark.parametrize("name", ["AllGatherDispatcher", "AllToAllDispatcher"])
def test_dispatchers_at_ep1_are_permute_and_unpermute(name):
    import mindspore as ms

    from mcore.moe import dispatcher
    from mcore.moe.permute import permute
    from mcore.parallel_state import ProcessGroup

    rng = np.random.default_rng(3)
    T, E, k = 6, 5, 2
    experts = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    experts[experts == 1] = E  # expert 1 receives nothing (its pairs dropped)
    x = rng.standard_normal((T, 4)).astype(np.float32)
    weights = rng.uniform(0.1, 1, (T, k)).astype(np.float32)
    d = getattr(dispatcher, name)(E, ProcessGroup.single("ep"))
    x_local, counts, handle = d.dispatch(ms.Tensor(x), ms.Tensor(experts))
    ref_sorted, ref_counts, _ = permute(ms.Tensor(x), ms.Tensor(experts), E)
    counts = np.asarray(counts.asnumpy() if isinstance(counts, ms.Tensor) else counts)
    np.testing.assert_array_equal(counts, ref_counts.asnumpy())
    assert counts[1] == 0
    n = int(counts.sum())
    np.testing.assert_array_equal(x_local.asnumpy()[:n], ref_sorted.asnumpy()[:n])
    y = d.combine(x_local * 2.0, ms.Tensor(weights), handle).asnumpy()
    expect = 2.0 * ((weights * (experts < E))[..., None] * x[:, None, :]).sum(1)
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-6)
