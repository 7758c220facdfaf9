"""TopKRouter and the routing functions against the numpy reference (single process)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcore.moe.config import MoEConfig
from tests.mcore.moe import numpy_ref as ref

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def routing_cases(draw):
    E = draw(st.sampled_from([2, 3, 4, 6, 8]))
    groups = draw(st.sampled_from([g for g in (0, 1, 2, 3, 4) if g == 0 or E % g == 0]))
    group_topk = draw(st.integers(1, groups)) if groups else 0
    max_k = group_topk * (E // groups) if groups else E
    group_score = "top2_sum" if groups and E // groups >= 2 and draw(st.booleans()) else "max"
    cfg = MoEConfig(num_experts=E, top_k=draw(st.integers(1, max_k)),
                    score_function=draw(st.sampled_from(["softmax", "sigmoid"])),
                    pre_softmax=draw(st.booleans()), normalize_topk=draw(st.booleans()),
                    scaling_factor=draw(st.sampled_from([1.0, 2.5])), num_groups=groups,
                    group_topk=group_topk, group_score=group_score,
                    expert_bias=draw(st.booleans()))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2 ** 16))
    return cfg, batch, seq, seed


def _router(cfg, hidden, seed):
    import mindspore as ms

    from mcore.moe.router import TopKRouter

    router = TopKRouter(hidden, cfg, seed=seed)
    if cfg.expert_bias:
        bias = np.random.default_rng(seed + 1).uniform(-0.3, 0.3, cfg.num_experts)
        router.expert_bias.set_data(ms.Tensor(bias.astype(np.float32)))
    return router


def _run(cfg, batch, seq, seed, hidden=8):
    import mindspore as ms

    router = _router(cfg, hidden, seed)
    x = np.random.default_rng(seed).standard_normal((batch, seq, hidden)).astype(np.float32) * 4
    weights, experts, aux, counts = router(ms.Tensor(x))
    logits = x.reshape(-1, hidden).astype(np.float64) @ router.weight.asnumpy().astype(np.float64).T
    bias = router.expert_bias.asnumpy().astype(np.float64) if cfg.expert_bias else None
    return (weights.asnumpy(), experts.asnumpy(), aux.asnumpy(), counts.asnumpy()), logits, bias


@SETTINGS
@given(routing_cases())
def test_topk_routing_matches_numpy(case):
    cfg, batch, seq, seed = case
    (weights, experts, _, counts), logits, bias = _run(cfg, batch, seq, seed)
    ref_w, ref_e = ref.route(logits, cfg, bias)
    np.testing.assert_array_equal(experts, ref_e)
    np.testing.assert_allclose(weights, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, np.bincount(ref_e.reshape(-1), minlength=cfg.num_experts))


@SETTINGS
@given(routing_cases(), st.floats(0.01, 0.5), st.floats(0.01, 0.5), st.floats(0.01, 0.5))
def test_aux_losses_match_numpy(case, c_lb, c_seq, c_z):
    cfg, batch, seq, seed = case
    cfg = dataclasses.replace(cfg, aux_loss_coeff=c_lb, seq_aux_loss_coeff=c_seq, z_loss_coeff=c_z)
    (_, _, aux, _), logits, bias = _run(cfg, batch, seq, seed)
    _, ref_e = ref.route(logits, cfg, bias)
    probs = ref.aux_probs(logits, cfg.score_function)
    E, k = cfg.num_experts, cfg.top_k
    expected = [c_lb * ref.switch_loss(probs, ref_e, E, k),
                c_seq * ref.seq_loss(probs, ref_e, E, k, batch), c_z * ref.z_loss(logits)]
    np.testing.assert_allclose(aux, expected, rtol=2e-5, atol=1e-7)


def test_aux_losses_are_zero_when_coefficients_are():
    (_, _, aux, _), _, _ = _run(MoEConfig(num_experts=4, top_k=2), 2, 3, 0)
    np.testing.assert_array_equal(aux, [0.0, 0.0, 0.0])


def test_switch_loss_is_one_when_balanced():
    import mindspore as ms

    from mcore.moe.routing import switch_load_balancing_loss

    probs = ms.Tensor(np.full((4, 4), 0.25, np.float32))
    counts = ms.Tensor(np.full(4, 2.0, np.float32))  # 4 tokens x top-2 over 4 experts
    assert abs(float(switch_load_balancing_loss(probs, counts, 2).asnumpy()) - 1.0) < 1e-6


@SETTINGS
@given(routing_cases(), st.sampled_from([0.25, 0.5, 1.0, 1.5]),
       st.sampled_from(["probs", "position"]))
def test_capacity_matches_numpy(case, factor, policy):
    cfg, batch, seq, seed = case
    cfg = dataclasses.replace(cfg, capacity_factor=factor, drop_policy=policy)
    (weights, experts, _, counts), logits, bias = _run(cfg, batch, seq, seed)
    ref_w, ref_e = ref.route(logits, cfg, bias)
    C = cfg.capacity(batch * seq)
    ref_w, ref_e = ref.capacity_drop(ref_w, ref_e, cfg.num_experts, C, policy)
    if policy == "position":
        np.testing.assert_array_equal(experts, ref_e)
        np.testing.assert_allclose(weights, ref_w, rtol=1e-5, atol=1e-6)
    else:  # equal weights may be kept in either order (top-k ties): compare per expert
        routed_w, routed_e = ref.route(logits, cfg, bias)
        kept = experts < cfg.num_experts
        np.testing.assert_array_equal(experts[kept], routed_e[kept])
        np.testing.assert_allclose(weights[kept], routed_w[kept], rtol=1e-5, atol=1e-6)
        assert (weights[~kept] == 0).all()
        for e in range(cfg.num_experts):
            np.testing.assert_allclose(np.sort(weights[experts == e]),
                                       np.sort(ref_w[ref_e == e]), rtol=1e-5, atol=1e-6)
    assert counts.max() <= C
    np.testing.assert_array_equal(counts, np.bincount(ref_e.reshape(-1),
                                                      minlength=cfg.num_experts + 1)[:-1])


def test_router_backward_matches_finite_differences():
    """d(sum(weights * r) + aux) / d(gate weight) vs central differences in float64 numpy."""
    import mindspore as ms

    cfg = MoEConfig(num_experts=6, top_k=2, score_function="sigmoid", normalize_topk=True,
                    num_groups=3, group_topk=2, aux_loss_coeff=0.1, seq_aux_loss_coeff=0.2,
                    z_loss_coeff=0.05, scaling_factor=1.5)
    router = _router(cfg, 5, 3)
    x = np.random.default_rng(7).standard_normal((2, 3, 5)).astype(np.float32)
    r = np.random.default_rng(8).standard_normal((6, 2))

    def loss(w):  # float64 reference of the same objective (selection fixed by the tie-free draw)
        logits = x.reshape(-1, 5).astype(np.float64) @ w.T
        weights, experts = ref.route(logits, cfg)
        probs = ref.aux_probs(logits, cfg.score_function)
        return ((weights * r).sum() + 0.1 * ref.switch_loss(probs, experts, 6, 2)
                + 0.2 * ref.seq_loss(probs, experts, 6, 2, 2) + 0.05 * ref.z_loss(logits))

    def objective(xt):
        weights, _, aux, _ = router(xt)
        return (weights * ms.Tensor(r.astype(np.float32))).sum() + aux.sum()

    grad = ms.grad(objective, grad_position=None, weights=[router.weight])(ms.Tensor(x))[0]
    w0 = router.weight.asnumpy().astype(np.float64)
    numeric = np.zeros_like(w0)
    for idx in np.ndindex(*w0.shape):
        d = np.zeros_like(w0)
        d[idx] = 1e-6
        numeric[idx] = (loss(w0 + d) - loss(w0 - d)) / 2e-6
    np.testing.assert_allclose(grad.asnumpy(), numeric, rtol=1e-3, atol=1e-5)


def test_router_under_jit_equals_pynative():
    import mindspore as ms

    cfg = MoEConfig(num_experts=8, top_k=2, num_groups=4, group_topk=2, group_score="top2_sum",
                    aux_loss_coeff=0.01, capacity_factor=1.0, pre_softmax=True)
    router = _router(cfg, 8, 11)
    x = ms.Tensor(np.random.default_rng(2).standard_normal((2, 4, 8)).astype(np.float32))
    eager = [t.asnumpy() for t in router(x)]
    compiled = [t.asnumpy() for t in ms.jit(router.construct)(x)]
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_expert_bias_update_moves_towards_balance():
    import mindspore as ms

    from mcore.moe.router import update_expert_bias
    from mcore.parallel_state import ProcessGroup

    router = _router(MoEConfig(num_experts=4, top_k=1, expert_bias=True,
                               bias_update_rate=0.01), 4, 0)
    before = router.expert_bias.asnumpy().copy()
    counts = ms.Tensor(np.array([5.0, 1.0, 2.0, 0.0], np.float32))  # mean 2
    delta = update_expert_bias(router, counts, ProcessGroup.single("edp")).asnumpy()
    np.testing.assert_allclose(delta, [-0.01, 0.01, 0.0, 0.01], atol=1e-8)
    np.testing.assert_allclose(router.expert_bias.asnumpy(), before + delta, atol=1e-7)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=4, top_k=5), "moe.top_k"),
    (dict(num_experts=4, num_groups=2, group_topk=3), "moe.group_topk"),
    (dict(num_experts=6, num_groups=4, group_topk=1), "moe.num_groups"),
    (dict(num_experts=4, capacity_factor=0.0), "moe.capacity_factor"),
    (dict(num_experts=4, capacity_factor=-1.0), "moe.capacity_factor"),
    (dict(num_experts=4, score_function="relu"), "moe.score_function"),
    (dict(num_experts=4, pad_to_capacity=True), "moe.pad_to_capacity"),
    (dict(num_experts=8, top_k=5, num_groups=4, group_topk=2), "moe.top_k"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        MoEConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_topk_then_softmax_equals_softmax_topk_renormalised():
    """The identity docs/moe.md states for Mixtral-style routing."""
    import mindspore as ms

    from mcore.moe.routing import topk_routing

    logits = ms.Tensor(np.random.default_rng(4).standard_normal((9, 6)).astype(np.float32))
    w1, e1 = topk_routing(logits, MoEConfig(num_experts=6, top_k=3))
    w2, e2 = topk_routing(logits, MoEConfig(num_experts=6, top_k=3, pre_softmax=True,
                                            normalize_topk=True))
    np.testing.assert_array_equal(e1.asnumpy(), e2.asnumpy())
    np.testing.assert_allclose(w1.asnumpy(), w2.asnumpy(), rtol=1e-6, atol=1e-7)
