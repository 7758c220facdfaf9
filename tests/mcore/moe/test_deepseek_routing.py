"""DeepSeek-V3 (noaux_tc) and DeepSeek-V2 (greedy / group_limited_greedy) routing of the
Hugging Face keys (``mcore.moe.hf_routing``) through ``TopKRouter``, against a per-token numpy
reference written here from the models' description; the weights' gradient vs finite
differences; every config error names its key."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mcore.moe.hf_routing import moe_config_from_hf, routing_from_hf

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GAP = 1e-3  # smallest score gap the reference accepts (fp32 router vs float64 reference)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _gap(values) -> float:
    """Smallest distance between two of ``values`` (inf for fewer than two)."""
    v = np.sort(np.asarray(values, np.float64))
    return float(np.diff(v).min()) if v.size > 1 else np.inf


def reference(logits, hf, bias=None):
    """Per-token routing of one DeepSeek gate: ``({expert: weight} per token, smallest gap
    between the scores any decision compared)``."""
    E, k = hf["n_routed_experts"], hf["num_experts_per_tok"]
    method = hf.get("topk_method", "greedy")
    scores = _sigmoid(logits) if hf.get("scoring_func", "softmax") == "sigmoid" else _softmax(logits)
    select = scores + (bias if method == "noaux_tc" else 0.0)
    routes, gap = [], np.inf
    for t in range(logits.shape[0]):
        candidates = list(range(E))
        if method != "greedy":
            G, per = hf["n_group"], E // hf["n_group"]
            group_score = []
            for g in range(G):
                members = np.sort(select[t, g * per:(g + 1) * per])[::-1]
                group_score.append(members[:2].sum() if method == "noaux_tc" else members[0])
            kept = np.argsort(group_score)[::-1][:hf["topk_group"]]
            gap = min(gap, _gap(group_score))
            candidates = [e for e in range(E) if e // per in kept]
        gap = min(gap, _gap(select[t, candidates]))
        chosen = sorted(candidates, key=lambda e: -select[t, e])[:k]
        w = scores[t, chosen]
        normalize = hf.get("norm_topk_prob", False) and k > 1
        if normalize:
            w = w / w.sum()
        if method == "noaux_tc" or not normalize:
            w = w * hf.get("routed_scaling_factor", 1.0)
        routes.append(dict(zip(chosen, w)))
    return routes, gap


@st.composite
def gates(draw, method):
    G = draw(st.sampled_from([1, 2, 4]))
    per = draw(st.sampled_from([2, 3] if method == "noaux_tc" else [1, 2, 3]))
    E = G * per
    topk_group = draw(st.integers(1, G))
    hf = {"n_routed_experts": E, "num_experts_per_tok": draw(st.integers(1, topk_group * per)),
          "topk_method": method, "norm_topk_prob": draw(st.booleans()),
          "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5])),
          "scoring_func": "sigmoid" if method == "noaux_tc" else "softmax"}
    if method != "greedy":
        hf.update(n_group=G, topk_group=topk_group)
    return hf, draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(0, 2 ** 16))


def _route(hf, batch, seq, seed, hidden=8):
    """Router outputs and the float64 logits / bias it saw."""
    import mindspore as ms

    from mcore.moe.router import TopKRouter

    cfg = moe_config_from_hf(hf)
    router = TopKRouter(hidden, cfg, seed=seed)
    rng = np.random.default_rng(seed)
    bias = rng.uniform(-0.3, 0.3, cfg.num_experts).astype(np.float32)
    router.expert_bias.set_data(ms.Tensor(bias))
    x = rng.standard_normal((batch, seq, hidden)).astype(np.float32) * 3
    weights, experts, _, counts = router(ms.Tensor(x))
    logits = x.reshape(-1, hidden).astype(np.float64) @ router.weight.asnumpy().astype(np.float64).T
    return weights.asnumpy(), experts.asnumpy(), counts.asnumpy(), logits, bias.astype(np.float64)


def _check(hf, batch, seq, seed):
    weights, experts, counts, logits, bias = _route(hf, batch, seq, seed)
    routes, gap = reference(logits, hf, bias)
    assume(gap > GAP)
    for t, route in enumerate(routes):
        got = dict(zip(experts[t].tolist(), weights[t].tolist()))
        assert sorted(got) == sorted(route), (t, got, route)
        np.testing.assert_allclose([got[e] for e in sorted(route)],
                                   [route[e] for e in sorted(route)], rtol=1e-5, atol=1e-6)
    expected = np.zeros(hf["n_routed_experts"])
    for route in routes:
        for e in route:
            expected[e] += 1
    np.testing.assert_array_equal(counts, expected)


@SETTINGS
@given(gates("noaux_tc"))
def test_deepseek_v3_routing_matches_numpy(case):
    _check(*case)


@SETTINGS
@given(gates("group_limited_greedy"))
def test_deepseek_v2_group_limited_routing_matches_numpy(case):
    _check(*case)


@SETTINGS
@given(gates("greedy"))
def test_deepseek_v2_greedy_routing_matches_numpy(case):
    _check(*case)


def test_v3_bias_selects_but_does_not_weigh():
    """A large bias on one expert makes every token pick it, with its unbiased weight."""
    hf = {"n_routed_experts": 4, "num_experts_per_tok": 2, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "n_group": 2, "topk_group": 1, "norm_topk_prob": False,
          "routed_scaling_factor": 1.0}
    import mindspore as ms

    from mcore.moe import routing

    cfg = moe_config_from_hf(hf)
    logits = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    bias = np.array([0, 0, 0, 10], np.float32)
    w, e = routing.topk_routing(ms.Tensor(logits), cfg, ms.Tensor(bias))
    e, w = e.asnumpy(), w.asnumpy()
    assert (e == 3).any(axis=1).all() and set(e.reshape(-1)) <= {2, 3}  # group 1 only
    np.testing.assert_allclose(w[e == 3], _sigmoid(logits[:, 3]), rtol=1e-6)


@pytest.mark.parametrize("hf", [
    {"n_routed_experts": 8, "num_experts_per_tok": 3, "topk_method": "noaux_tc",
     "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
     "routed_scaling_factor": 2.5},
    {"n_routed_experts": 6, "num_experts_per_tok": 2, "topk_method": "group_limited_greedy",
     "n_group": 3, "topk_group": 2, "routed_scaling_factor": 16.0},
])
def test_weight_gradient_matches_finite_differences(hf):
    """d(sum_j c_j w_j)/d logits of the routing weights (selection held fixed)."""
    import mindspore as ms

    from mcore.moe import routing

    cfg = moe_config_from_hf(hf)
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, hf["n_routed_experts"])).astype(np.float32) * 2
    bias = ms.Tensor(rng.uniform(-0.2, 0.2, hf["n_routed_experts"]).astype(np.float32))
    c = rng.standard_normal((5, hf["num_experts_per_tok"])).astype(np.float32)

    def f(z):
        return (routing.topk_routing(z, cfg, bias if cfg.expert_bias else None)[0]
                * ms.Tensor(c)).sum()

    grad = ms.grad(f)(ms.Tensor(logits)).asnumpy()
    eps, numeric = 1e-2, np.zeros_like(logits, np.float64)
    for idx in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (float(f(ms.Tensor(up)).asnumpy()) - float(f(ms.Tensor(down)).asnumpy())) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=2e-2, atol=2e-3)
    assert np.abs(grad).max() > 1e-3  # the check is not vacuous


def test_mapping_of_the_other_keys():
    hf = {"n_routed_experts": 8, "num_experts_per_tok": 2, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
          "routed_scaling_factor": 2.5, "moe_intermediate_size": 16, "n_shared_experts": 2,
          "first_k_dense_replace": 1, "moe_layer_freq": 1, "aux_loss_alpha": 0.001,
          "seq_aux": True}
    cfg = moe_config_from_hf(hf, aux_losses=True, capacity_factor=2.0)
    assert (cfg.ffn_hidden_size, cfg.shared_ffn_hidden_size, cfg.first_k_dense) == (16, 32, 1)
    assert not cfg.shared_expert_gate and cfg.expert_bias and cfg.group_score == "top2_sum"
    assert (cfg.seq_aux_loss_coeff, cfg.aux_loss_coeff, cfg.capacity_factor) == (0.001, 0.0, 2.0)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    v2 = routing_from_hf({"n_routed_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
                          "routed_scaling_factor": 16.0})
    assert (v2["normalize_topk"], v2["scaling_factor"], v2["expert_bias"]) == (True, 1.0, False)


@pytest.mark.parametrize("change, key", [
    ({"topk_group": 5}, "topk_group"),
    ({"n_group": 3}, "n_group"),
    ({"topk_method": "best"}, "topk_method"),
    ({"scoring_func": "tanh"}, "scoring_func"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
    ({"n_group": 8}, "n_group"),  # one expert per group cannot give a top-2 sum
])
def test_bad_keys_name_the_key(change, key):
    hf = {"n_routed_experts": 8, "num_experts_per_tok": 2, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2, **change}
    with pytest.raises(ValueError) as err:
        routing_from_hf(hf)
    message = str(err.value)
    assert message.startswith(f"{key}=") and "\n" not in message
