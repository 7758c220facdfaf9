"""Expert parallelism on 2 real ranks (one launch runs every check, ``_worker``):

- dispatch -> combine with identity experts and weights 1/k is the identity, forward and
  backward, for both dispatchers, with uneven counts, an expert that gets no token, and a
  routing where one rank receives nothing;
- MoELayer with ep=2 equals the ep=1 layer on each rank's tokens, forward and backward
  (router and input gradients per rank; each expert's gradient = the sum of the ep=1
  gradients over both ranks' tokens), for both dispatchers, with capacity padding and with a
  shared expert; the all-gather layer also under ``mindspore.jit``;
- the expert-bias update counts the load over the whole group.

Each rank draws every rank's input from a seed, so it computes the ep=1 references alone.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank

H, E, K, T = 8, 4, 2, 6
DISPATCHERS = ("AllGatherDispatcher", "AllToAllDispatcher")


def _routing(rank: int, scenario: str):
    """experts [T, K] of ``rank``: "uneven" (expert 3 unused, ranks differ) or "to_rank0"
    (only experts 0 and 1, both on rank 0: rank 1 receives no token)."""
    rng = np.random.default_rng(50 + rank)
    if scenario == "to_rank0":
        return np.tile(np.array([[0, 1]], np.int32), (T, 1))
    choices = [[0, 2], [2, 1], [1, 0]] if rank == 0 else [[2, 0], [0, 1], [2, 1], [1, 2]]
    return np.array([choices[i] for i in rng.integers(0, len(choices), T)], np.int32)


def _x(rank: int, shape, salt: int = 0):
    return np.random.default_rng(100 * salt + rank).standard_normal(shape).astype(np.float32)


def _check_round_trip(ctx, dims, name, scenario):
    import mindspore as ms

    from mcore.moe import dispatcher

    r = dims.ep.rank
    d = getattr(dispatcher, name)(E, dims.ep)
    experts = [_routing(q, scenario) for q in range(2)]
    x = ms.Tensor(_x(r, (T, H)))
    weights = ms.Tensor(np.full((T, K), 1.0 / K, np.float32))
    g = _x(r, (T, H), salt=1)

    def objective(xt):
        x_local, counts, handle = d.dispatch(xt, ms.Tensor(experts[r]))
        return (d.combine(x_local * 2.0, weights, handle) * ms.Tensor(g)).sum()

    with ctx.check(f"round_trip_{name}_{scenario}"):
        x_local, counts, handle = d.dispatch(x, ms.Tensor(experts[r]))
        counts = np.asarray(counts.asnumpy() if isinstance(counts, ms.Tensor) else counts)
        every = np.concatenate([e.reshape(-1) for e in experts])
        expect = np.bincount(every, minlength=E)[2 * r:2 * r + 2]
        np.testing.assert_array_equal(counts, expect)
        rows = x_local.asnumpy()[:int(counts.sum())]
        xs = [_x(q, (T, H)) for q in range(2)]
        # local expert e's rows: tokens of rank 0 then rank 1 that chose it, in token order
        wanted = [xs[q][t] for e in (2 * r, 2 * r + 1) for q in range(2) for t in range(T)
                  if e in experts[q][t]]
        np.testing.assert_array_equal(rows, np.array(wanted).reshape(-1, H))
        y = d.combine(x_local, weights, handle).asnumpy()
        np.testing.assert_allclose(y, xs[r], rtol=1e-6, atol=1e-6)
        dx = ms.grad(objective)(x).asnumpy()
        np.testing.assert_allclose(dx, 2.0 * g, rtol=1e-6, atol=1e-6)


def _layer(moe, groups, dispatcher_name):
    from mcore.moe import dispatcher
    from mcore.moe.layer import MoELayer, MoESubmodules
    from mcore.transformer.config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2,
                               ffn_hidden_size=16)
    sub = MoESubmodules(dispatcher=getattr(dispatcher, dispatcher_name))
    return MoELayer(config, sub, moe=moe, groups=groups, layer_number=2)


def _value_and_grads(layer, x, g, compile_fn=None):
    import mindspore as ms

    def objective(xt):
        y, aux, _ = layer(xt)
        return (y * ms.Tensor(g)).sum() + aux.sum(), y

    params = layer.trainable_params()
    fn = ms.value_and_grad(objective, grad_position=0, weights=params, has_aux=True)
    (_, y), (dx, dw) = (compile_fn(fn) if compile_fn else fn)(ms.Tensor(x))
    return y.asnumpy(), dx.asnumpy(), {p.name: d.asnumpy() for p, d in zip(params, dw)}


def _check_layer(ctx, dims, name, tag, moe, jit=False):
    import mindspore as ms

    from mcore.moe.groups import MoEGroups

    r = dims.ep.rank
    xs = [_x(q, (2, 3, H), salt=2) for q in range(2)]
    gs = [_x(q, (2, 3, H), salt=3) for q in range(2)]
    single = _layer(moe, MoEGroups.single(), name)
    refs = [_value_and_grads(single, xs[q], gs[q]) for q in range(2)]
    layer = _layer(moe, MoEGroups.from_dims(dims), name)
    with ctx.check(f"layer_{name}_{tag}"):
        y, dx, dw = _value_and_grads(layer, xs[r], gs[r], ms.jit if jit else None)
        y_ref, dx_ref, dw_ref = refs[r]
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-6)
        for pname, grad in dw.items():
            if pname.startswith("experts."):  # local experts 2r, 2r+1 of the full stack
                full = refs[0][2][pname] + refs[1][2][pname]
                np.testing.assert_allclose(grad, full[2 * r:2 * r + 2], rtol=1e-4, atol=1e-6)
            else:  # replicated: router, shared expert, gate
                np.testing.assert_allclose(grad, dw_ref[pname], rtol=1e-4, atol=1e-6)
        assert any(np.abs(v).max() > 0 for k, v in dw.items() if k.startswith("experts."))


def _check_bias_update(ctx, dims):
    import mindspore as ms

    from mcore.moe.config import MoEConfig
    from mcore.moe.router import TopKRouter, update_expert_bias

    router = TopKRouter(H, MoEConfig(num_experts=E, top_k=1, expert_bias=True,
                                     bias_update_rate=0.5))
    local = [np.array([3.0, 0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0, 3.0])][dims.ep.rank]
    with ctx.check("bias_update_over_group"):
        delta = update_expert_bias(router, ms.Tensor(local.astype(np.float32)), dims.ep)
        # group load [3, 0, 2, 3], mean 2: over-loaded experts go down, the others up
        np.testing.assert_allclose(delta.asnumpy(), [-0.5, 0.5, 0.0, -0.5])
        np.testing.assert_allclose(router.expert_bias.asnumpy(), [-0.5, 0.5, 0.0, -0.5])


def _worker(ctx):
    from mcore.moe.config import MoEConfig
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(ep=2)
    _check_bias_update(ctx, dims)
    for name in DISPATCHERS:
        for scenario in ("uneven", "to_rank0"):
            _check_round_trip(ctx, dims, name, scenario)
    base = MoEConfig(num_experts=E, top_k=K, ffn_hidden_size=6, aux_loss_coeff=0.01,
                     seq_aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    variants = {
        "dropless": base,
        "padded": MoEConfig(num_experts=E, top_k=K, ffn_hidden_size=6, capacity_factor=0.75,
                            pad_to_capacity=True, aux_loss_coeff=0.01),
        "shared": MoEConfig(num_experts=E, top_k=1, ffn_hidden_size=6, score_function="sigmoid",
                            normalize_topk=True, shared_ffn_hidden_size=5,
                            shared_expert_gate=True),
    }
    for name in DISPATCHERS:
        for tag, moe in variants.items():
            _check_layer(ctx, dims, name, tag, moe)
    _check_layer(ctx, dims, "AllGatherDispatcher", "jit", base, jit=True)


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.mcore.moe.test_moe_multirank:_worker", timeout=600)


@pytest.mark.parametrize("name", DISPATCHERS)
@pytest.mark.parametrize("scenario", ["uneven", "to_rank0"])
def test_dispatch_combine_is_identity_on_two_ranks(job, name, scenario):
    job.assert_ok(f"round_trip_{name}_{scenario}")


@pytest.mark.parametrize("name", DISPATCHERS)
@pytest.mark.parametrize("tag", ["dropless", "padded", "shared"])
def test_ep2_layer_equals_ep1_forward_and_backward(job, name, tag):
    job.assert_ok(f"layer_{name}_{tag}")


def test_expert_bias_update_counts_the_group_load(job):
    job.assert_ok("bias_update_over_group")


def test_ep2_allgather_layer_under_jit(job):
    job.assert_ok("layer_AllGatherDispatcher_jit")
