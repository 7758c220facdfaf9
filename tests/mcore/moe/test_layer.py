"""MoELayer in one process: vs a numpy loop over tokens, every dispatcher x experts pairing
agreeing forward and backward, capacity padding, shared experts, jit, and the ModuleSpec path."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.mcore.moe import numpy_ref as ref

H = 8


def _config(activation="swiglu"):
    from mcore.transformer.config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2,
                             ffn_hidden_size=16, activation=activation)


def _moe(**kw):
    from mcore.moe.config import MoEConfig

    base = dict(num_experts=4, top_k=2, ffn_hidden_size=6, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    return MoEConfig(**{**base, **kw})


def _layer(moe, experts="GroupedMLP", dispatcher="AllToAllDispatcher", activation="swiglu"):
    from mcore.moe import dispatcher as dispatchers
    from mcore.moe import experts as expert_classes
    from mcore.moe.layer import MoELayer, MoESubmodules

    sub = MoESubmodules(experts=getattr(expert_classes, experts),
                        dispatcher=getattr(dispatchers, dispatcher))
    return MoELayer(_config(activation), sub, moe=moe, layer_number=1)


def _x(seed=0, b=2, s=5):
    return np.random.default_rng(seed).standard_normal((b, s, H)).astype(np.float32)


def _reference(layer, moe, x, activation="swiglu"):
    """numpy: y[t] = sum_j w[t, j] * expert_{e[t, j]}(x[t]) (+ shared), routing from the
    layer's router (tested on its own in test_router.py)."""
    import mindspore as ms

    from mcore.moe.experts import expert_weights

    weights, experts, aux, counts = [t.asnumpy() for t in layer.router(ms.Tensor(x))]
    tokens = x.reshape(-1, H).astype(np.float64)
    y = np.zeros_like(tokens)
    cfg = _config(activation)
    for t in range(tokens.shape[0]):
        for j in range(moe.top_k):
            e = experts[t, j]
            if e < moe.num_experts:
                w1, w2 = expert_weights(cfg, moe.ffn_hidden_size, e, 1)
                y[t] += weights[t, j] * ref.expert_mlp(tokens[t:t + 1], w1, w2, activation)[0]
    if moe.shared_ffn_hidden_size:
        mlp = layer.shared_experts
        w1 = mlp.linear_fc1.weight.asnumpy().T.astype(np.float64)
        w2 = mlp.linear_fc2.weight.asnumpy().T.astype(np.float64)
        shared = ref.expert_mlp(tokens, w1, w2, activation)
        if moe.shared_expert_gate:
            shared = shared * ref.sigmoid(tokens @ layer.shared_gate.asnumpy().astype(np.float64))
        y += shared
    return y.reshape(x.shape), aux, counts


PAIRINGS = [("GroupedMLP", "AllToAllDispatcher"), ("GroupedMLP", "AllGatherDispatcher"),
            ("SequentialMLP", "AllToAllDispatcher"), ("SequentialMLP", "AllGatherDispatcher")]


@pytest.mark.parametrize("experts, dispatcher", PAIRINGS)
@pytest.mark.parametrize("moe_kw", [
    dict(),
    dict(score_function="sigmoid", normalize_topk=True, expert_bias=True, num_groups=2,
         group_topk=1, top_k=2),
    dict(capacity_factor=0.5, drop_policy="position"),
    dict(capacity_factor=0.75, pad_to_capacity=True),
    dict(shared_ffn_hidden_size=5, shared_expert_gate=True, top_k=1),
])
def test_layer_matches_numpy(experts, dispatcher, moe_kw):
    import mindspore as ms

    moe = _moe(**moe_kw)
    layer = _layer(moe, experts, dispatcher)
    x = _x()
    y, aux, counts = layer(ms.Tensor(x))
    expect, ref_aux, ref_counts = _reference(layer, moe, x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y.asnumpy(), expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(aux.asnumpy(), ref_aux)
    np.testing.assert_array_equal(counts.asnumpy(), ref_counts)
    if moe.capacity_factor is not None:
        assert ref_counts.sum() < x.shape[0] * x.shape[1] * moe.top_k  # something was dropped


def _grads(layer, x, g):
    import mindspore as ms

    def objective(xt):
        y, aux, _ = layer(xt)
        return (y * ms.Tensor(g)).sum() + aux.sum()

    params = layer.trainable_params()
    dx, dw = ms.grad(objective, grad_position=0, weights=params)(ms.Tensor(x))
    named = {p.name: d.asnumpy() for p, d in zip(params, dw)}
    return dx.asnumpy(), named


def _expert_grads(named):
    """(fc1 [E, h, F], fc2 [E, f, h]) from either expert class's gradient names."""
    if "experts.fc1" in named:
        return named["experts.fc1"], named["experts.fc2"]
    fc1 = [named[f"experts.local_experts.{e}.linear_fc1.weight"].T for e in range(4)]
    fc2 = [named[f"experts.local_experts.{e}.linear_fc2.weight"].T for e in range(4)]
    return np.stack(fc1), np.stack(fc2)


@pytest.mark.parametrize("moe_kw", [dict(), dict(capacity_factor=0.75, pad_to_capacity=True)])
def test_all_pairings_agree_in_backward(moe_kw):
    moe = _moe(seq_aux_loss_coeff=0.01, **moe_kw)
    x = _x(1)
    g = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    results = [_grads(_layer(moe, e, d), x, g) for e, d in PAIRINGS]
    dx0, named0 = results[0]
    fc1_0, fc2_0 = _expert_grads(named0)
    assert np.abs(named0["router.weight"]).max() > 0 and np.abs(fc1_0).max() > 0
    for dx, named in results[1:]:
        np.testing.assert_allclose(dx, dx0, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(named["router.weight"], named0["router.weight"], rtol=1e-4,
                                   atol=1e-6)
        fc1, fc2 = _expert_grads(named)
        np.testing.assert_allclose(fc1, fc1_0, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(fc2, fc2_0, rtol=1e-4, atol=1e-6)


def test_dx_matches_finite_differences():
    """One input direction: <dL/dx, v> vs (L(x + eps v) - L(x - eps v)) / 2 eps in float64
    numpy (dropless, so the routing does not change under the small step)."""
    from mcore.moe.experts import expert_weights

    moe = _moe(aux_loss_coeff=0.0, z_loss_coeff=0.0)
    layer = _layer(moe)
    x = _x(4)
    g = np.random.default_rng(5).standard_normal(x.shape)
    v = np.random.default_rng(6).standard_normal(x.shape)
    dx, _ = _grads(layer, x, g.astype(np.float32))
    w_router = layer.router.weight.asnumpy().astype(np.float64)

    def loss(xv):
        logits = xv.reshape(-1, H) @ w_router.T
        weights, experts = ref.route(logits, moe)
        y = np.zeros((logits.shape[0], H))
        for t in range(logits.shape[0]):
            for j in range(moe.top_k):
                w1, w2 = expert_weights(_config(), 6, experts[t, j], 1)
                y[t] += weights[t, j] * ref.expert_mlp(xv.reshape(-1, H)[t:t + 1], w1, w2,
                                                       "swiglu")[0]
        return float((y.reshape(x.shape) * g).sum())

    eps = 1e-5
    numeric = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    assert abs((dx * v).sum() - numeric) <= 1e-3 * max(1.0, abs(numeric))


def test_allgather_grouped_layer_compiles_under_jit():
    import mindspore as ms

    layer = _layer(_moe(capacity_factor=1.0, pad_to_capacity=True), "GroupedMLP",
                   "AllGatherDispatcher")
    x = ms.Tensor(_x(7))
    eager = [t.asnumpy() for t in layer(x)]
    compiled = [t.asnumpy() for t in ms.jit(layer.construct)(x)]
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_builds_from_a_module_spec_with_transformer_layer_arguments():
    import mindspore as ms

    from mcore.moe.dispatcher import AllGatherDispatcher
    from mcore.moe.layer import MoELayer, MoESubmodules
    from mcore.parallel_state import ModelGroups
    from mcore.transformer.spec import ModuleSpec, build_module

    spec = ModuleSpec(MoELayer, params={"moe": _moe()},
                      submodules=MoESubmodules(dispatcher=AllGatherDispatcher))
    layer = build_module(spec, _config(), groups=ModelGroups.single(), layer_number=1)
    y, aux, counts = layer(ms.Tensor(_x()))
    assert y.shape == (2, 5, H) and aux.shape == (3,) and counts.shape == (4,)
    assert int(counts.asnumpy().sum()) == 2 * 5 * 2


def test_rejects_unsupported_groups_and_sizes():
    from mcore.moe.groups import MoEGroups
    from mcore.moe.layer import MoELayer, MoESubmodules
    from mcore.parallel_state import ProcessGroup

    cp2 = ProcessGroup("cp", (0, 1), 0, "fake")
    groups = dataclasses.replace(MoEGroups.single(), cp=cp2)
    with pytest.raises(NotImplementedError, match="cp size 2"):
        MoELayer(_config(), MoESubmodules(), moe=_moe(), groups=groups)
    etp2 = ProcessGroup("etp", (0, 1), 0, "fake")
    with pytest.raises(ValueError, match="moe.ffn_hidden_size over etp: size 5 is not divisible"):
        MoELayer(_config(), MoESubmodules(), moe=_moe(ffn_hidden_size=5),
                 groups=dataclasses.replace(MoEGroups.single(), etp=etp2))
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        MoELayer(_config(), MoESubmodules(), moe=_moe(ffn_hidden_size=0))
    with pytest.raises(ValueError, match="not divisible by the ep group size 3"):
        ep3 = ProcessGroup("ep", (0, 1, 2), 0, "fake")
        MoELayer(_config(), MoESubmodules(), moe=_moe(),
                 groups=dataclasses.replace(MoEGroups.single(), ep=ep3))
