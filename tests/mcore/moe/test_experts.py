"""grouped_matmul (both forms) vs numpy, and GroupedMLP == SequentialMLP forward and backward."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.mcore.moe import numpy_ref as ref

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _config(activation="swiglu", hidden=8):
    from mcore.transformer.config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2,
                             ffn_hidden_size=16, activation=activation)


@st.composite
def grouped_cases(draw):
    E = draw(st.integers(1, 5))
    counts = draw(st.lists(st.integers(0, 4), min_size=E, max_size=E))
    # trailing rows that belong to no expert (dropped pairs); at least one row in all
    extra = draw(st.integers(0 if sum(counts) else 1, 3))
    return counts, extra, draw(st.integers(0, 2 ** 16))


@SETTINGS
@given(grouped_cases(), st.sampled_from(["list", "tensor"]))
def test_grouped_matmul_forward_backward_matches_numpy(case, form):
    import mindspore as ms

    from mcore.moe.grouped_matmul import grouped_matmul

    counts, extra, seed = case
    rng = np.random.default_rng(seed)
    E, N = len(counts), sum(counts) + extra
    x = rng.standard_normal((N, 3)).astype(np.float32)
    w = rng.standard_normal((E, 3, 4)).astype(np.float32)
    g = rng.standard_normal((N, 4)).astype(np.float32)
    owner = np.repeat(np.arange(E + 1), counts + [extra])
    expect = np.stack([x[i] @ w[o] if o < E else np.zeros(4) for i, o in enumerate(owner)])
    # gradients of sum(out * g): dx_i = g_i w_o^T, dw_e = sum over rows of e of x_i^T g_i
    dx = np.stack([g[i] @ w[o].T if o < E else np.zeros(3) for i, o in enumerate(owner)])
    dw = np.stack([x[owner == e].T @ g[owner == e] for e in range(E)])
    tpe = counts if form == "list" else ms.Tensor(np.array(counts, np.int32))

    def objective(xt, wt):
        return (grouped_matmul(xt, wt, tpe) * ms.Tensor(g)).sum()

    out = grouped_matmul(ms.Tensor(x), ms.Tensor(w), tpe).asnumpy()
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    gx, gw = ms.grad(objective, grad_position=(0, 1))(ms.Tensor(x), ms.Tensor(w))
    np.testing.assert_allclose(gx.asnumpy(), dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw.asnumpy(), dw, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_tensor_form_compiles():
    import mindspore as ms

    from mcore.moe.grouped_matmul import grouped_matmul

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal((3, 3, 2))
    counts = ms.Tensor(np.array([2, 0, 4], np.int32))

    def run(xt, wt, c):
        return grouped_matmul(xt, wt, c)

    eager = run(ms.Tensor(x), ms.Tensor(w.astype(np.float32)), counts).asnumpy()
    compiled = ms.jit(run)(ms.Tensor(x), ms.Tensor(w.astype(np.float32)), counts).asnumpy()
    np.testing.assert_allclose(compiled, eager, rtol=1e-6)
    np.testing.assert_allclose(eager[6], 0.0)  # the row past the counts


def test_grouped_matmul_rejects_bad_counts():
    import mindspore as ms

    from mcore.moe.grouped_matmul import grouped_matmul

    x, w = ms.Tensor(np.zeros((3, 2), np.float32)), ms.Tensor(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        grouped_matmul(x, w, [2, 2])


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 2, 4], [0, 0, 0, 5], [2, 2, 2, 2]])
def test_grouped_mlp_equals_sequential_mlp(activation, counts):
    import mindspore as ms

    from mcore.moe.experts import GroupedMLP, SequentialMLP, expert_weights

    config = _config(activation)
    kw = dict(ffn_hidden_size=6, num_experts=6, first_expert=2, num_local=4, layer_number=3)
    grouped, sequential = GroupedMLP(config, **kw), SequentialMLP(config, **kw)
    N = sum(counts) + 1  # one trailing dropped row
    rng = np.random.default_rng(sum(counts))
    x = rng.standard_normal((N, 8)).astype(np.float32)
    g = ms.Tensor(rng.standard_normal((N, 8)).astype(np.float32))

    def run(cell, form):
        def objective(xt):
            return (cell(xt, form) * g).sum()

        out = cell(ms.Tensor(x), form).asnumpy()
        grads = ms.value_and_grad(objective, grad_position=0, weights=cell.trainable_params())(
            ms.Tensor(x))[1]
        return out, grads[0].asnumpy(), [p.asnumpy() for p in grads[1]]

    out_s, dx_s, dw_s = run(sequential, counts)
    owner = np.repeat(np.arange(5), counts + [1])
    expect = np.zeros((N, 8))
    for i, o in enumerate(owner):
        if o < 4:
            w1, w2 = expert_weights(config, 6, 2 + o, 3)
            expect[i] = ref.expert_mlp(x[i:i + 1].astype(np.float64), w1, w2, activation)[0]
    np.testing.assert_allclose(out_s, expect, rtol=1e-4, atol=1e-5)
    for form in (counts, ms.Tensor(np.array(counts, np.int32))):
        out_g, dx_g, dw_g = run(grouped, form)
        np.testing.assert_allclose(out_g, out_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx_g, dx_s, rtol=1e-5, atol=1e-6)
        # sequential grads: per expert (fc1 [2f, h], fc2 [h, f]); grouped: stacked, transposed
        fc1_s = np.stack([dw_s[2 * e].T for e in range(4)])
        fc2_s = np.stack([dw_s[2 * e + 1].T for e in range(4)])
        np.testing.assert_allclose(dw_g[0], fc1_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dw_g[1], fc2_s, rtol=1e-5, atol=1e-6)
        for e in range(4):  # an expert without rows gets a zero gradient, the others do not
            assert (np.abs(fc1_s[e]).max() == 0) == (counts[e] == 0)


def test_experts_reject_biases_and_bad_ranges():
    import dataclasses

    from mcore.moe.experts import GroupedMLP

    with pytest.raises(ValueError, match="mlp_fc1_bias"):
        GroupedMLP(dataclasses.replace(_config(), mlp_fc1_bias=True), 4, 2)
    with pytest.raises(ValueError, match="local experts"):
        GroupedMLP(_config(), 4, num_experts=4, first_expert=3, num_local=2)


@pytest.mark.parametrize("cls", ["GroupedMLP", "SequentialMLP"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_etp_shards_sum_to_the_whole_expert(cls, activation):
    """Expert tensor parallelism without communication: the two etp ranks' partial outputs add
    up to the unsplit experts' output, and their weights are the column / row slices (gate and
    up split separately)."""
    import mindspore as ms

    from mcore.moe import experts
    from mcore.parallel_state import ProcessGroup

    counts = [3, 0, 2]
    x = ms.Tensor(np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32))
    make = getattr(experts, cls)
    whole = make(_config(activation), ffn_hidden_size=6, num_experts=4, first_expert=1,
                 num_local=3, layer_number=2)
    parts = [make(_config(activation), ffn_hidden_size=6, num_experts=4, first_expert=1,
                  num_local=3, layer_number=2, etp=ProcessGroup("etp", (0, 1), r, "fake"))
             for r in range(2)]
    total = sum(p(x, counts).asnumpy() for p in parts)
    np.testing.assert_allclose(total, whole(x, counts).asnumpy(), rtol=1e-5, atol=1e-6)
    if cls == "GroupedMLP":
        fc1 = whole.fc1.asnumpy()  # [El, h, 2f]
        halves = np.split(fc1, 2, -1) if activation == "swiglu" else [fc1]
        for r, p in enumerate(parts):
            want = np.concatenate([np.split(h, 2, -1)[r] for h in halves], -1)
            np.testing.assert_array_equal(p.fc1.asnumpy(), want)
            np.testing.assert_array_equal(p.fc2.asnumpy(), np.split(whole.fc2.asnumpy(), 2, 1)[r])
    with pytest.raises(ValueError, match="moe.ffn_hidden_size over etp: size 6 is not divisible"):
        make(_config(activation), ffn_hidden_size=6, num_experts=4,
             etp=ProcessGroup("etp", (0, 1, 2, 3), 0, "fake"))
