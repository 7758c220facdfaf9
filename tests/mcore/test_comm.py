"""Every collective and differentiable form on 2 and 4 real ranks, PyNative and jit, vs numpy.

One launch per world size runs all checks (``_worker``); the tests below read its results.
Each rank draws every rank's input from a seed, so it can compute the numpy reference alone.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank



def _data(rank: int, shape, salt: int = 0) -> np.ndarray:
    return np.random.default_rng(1000 * salt + rank).standard_normal(shape).astype(np.float32)


def _worker(ctx):
    import mindspore as ms
    from mindspore import ops

    from mcore import comm
    from mcore.parallel_state import ParallelDims
    from tests.ms_helpers import MODES, Apply, compiler

    dims = ParallelDims.build(tp=2)
    shape = (4, 8)
    groups = {"world": dims.world, "tp": dims.tp, "dp": dims.dp}
    for mode in MODES:
        wrap = compiler(mode)
        for gname, g in groups.items():
            if g.size == 1:
                continue
            P, r = g.size, g.rank
            xs = [_data(gr, shape) for gr in g.ranks]
            x = ms.Tensor(xs[r])
            tag = f"{mode}_{gname}{P}"

            def run(fn, t, *args):
                return wrap(Apply(fn, args))(t).asnumpy()

            with ctx.check(f"all_reduce_sum_{tag}"):
                got = run(comm.all_reduce, x, g)
                np.testing.assert_allclose(got, np.sum(xs, 0), rtol=1e-6, atol=1e-6)
            for op, ref in (("max", np.max), ("min", np.min)):
                with ctx.check(f"all_reduce_{op}_{tag}"):
                    got = run(comm.all_reduce, x, g, op)
                    np.testing.assert_array_equal(got, ref(xs, 0))
            for dim in (0, 1):
                with ctx.check(f"all_gather_dim{dim}_{tag}"):
                    got = run(comm.all_gather, x, g, dim)
                    np.testing.assert_array_equal(got, np.concatenate(xs, dim))
                with ctx.check(f"reduce_scatter_dim{dim}_{tag}"):
                    got = run(comm.reduce_scatter, x, g, dim)
                    ref = np.split(np.sum(xs, 0), P, dim)[r]
                    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
            for s_dim, c_dim in ((0, 1), (1, 0), (1, 1)):
                with ctx.check(f"all_to_all_s{s_dim}c{c_dim}_{tag}"):
                    got = run(comm.all_to_all, x, g, s_dim, c_dim)
                    ref = np.concatenate([np.split(xs[s], P, s_dim)[r] for s in range(P)], c_dim)
                    np.testing.assert_array_equal(got, ref)
            with ctx.check(f"broadcast_{tag}"):
                got = run(comm.broadcast, x, g, P - 1)
                np.testing.assert_array_equal(got, xs[P - 1])
            _check_grads(ctx, tag, wrap, g, xs)
            if mode == "pynative":
                _check_uneven(ctx, tag, g)
    with ctx.check("barrier"):
        comm.barrier(dims.world)
    _check_p2p(ctx, dims.world)
    with ctx.check("size_one_group_is_identity"):
        from mcore.parallel_state import ProcessGroup

        one = ProcessGroup.single()
        t = ms.Tensor(_data(0, (2, 2)))
        for f in (comm.all_reduce, comm.all_gather, comm.reduce_scatter, comm.all_to_all, comm.broadcast):
            assert f(t, one) is t, f.__name__
        assert ops.equal(comm.DifferentiableAllGather(one)(t), t).all()


def _check_grads(ctx, tag, wrap, g, xs):
    """Gradient of sum_r <w_r, form(x_r)> for every differentiable form, against numpy."""
    import mindspore as ms

    from mcore import comm

    P, r = g.size, g.rank
    x = ms.Tensor(xs[r])
    full = np.sum(xs, 0)
    cases = {
        # name: (cell, output shape, expected dx given the per-rank output weights ws)
        "identity": (comm.DifferentiableIdentity(g), xs[r].shape, lambda ws: np.sum(ws, 0)),
        "allreduce": (comm.DifferentiableAllReduceSum(g), full.shape, lambda ws: ws[r]),
        "allgather": (comm.DifferentiableAllGather(g, 1), (4, 8 * P),
                      lambda ws: np.split(np.sum(ws, 0), P, 1)[r]),
        "reducescatter": (comm.DifferentiableReduceScatter(g, 0), (4 // P, 8),
                          lambda ws: np.concatenate(ws, 0)),
        "split": (comm.DifferentiableSplit(g, 1), (4, 8 // P), lambda ws: np.concatenate(ws, 1)),
        "alltoall": (comm.DifferentiableAllToAll(g, 0, 1), (4 // P, 8 * P),
                     lambda ws: np.concatenate([np.split(ws[s], P, 1)[r] for s in range(P)], 0)),
    }
    for name, (cell, out_shape, expected) in cases.items():
        ws = [_data(gr, out_shape, salt=7) for gr in g.ranks]
        w = ms.Tensor(ws[r])

        def loss(t):
            return (cell(t) * w).sum()

        with ctx.check(f"grad_{name}_{tag}"):
            got = wrap(ms.grad(loss))(x).asnumpy()
            np.testing.assert_allclose(got, expected(ws), rtol=1e-5, atol=1e-5)


def _check_uneven(ctx, tag, g):
    import mindspore as ms

    from mcore import comm

    P, r = g.size, g.rank
    # rank s sends (s + j) % 3 + (j == 0) rows to rank j: unequal, some zero.
    counts = [[(s + j) % 3 + (j == 0) for j in range(P)] for s in range(P)]
    rows = [sum(c) for c in counts]
    xs = [_data(gr, (rows[s], 3), salt=3) for s, gr in enumerate(g.ranks)]
    ref = []
    for s in range(P):
        start = sum(counts[s][:r])
        ref.append(xs[s][start:start + counts[s][r]])
    with ctx.check(f"all_to_all_uneven_{tag}"):
        got = comm.all_to_all_uneven(ms.Tensor(xs[r]), g, counts[r]).asnumpy()
        np.testing.assert_array_equal(got, np.concatenate(ref, 0))
    with ctx.check(f"all_to_all_uneven_given_recv_{tag}"):
        recv = [counts[s][r] for s in range(P)]
        got = comm.all_to_all_uneven(ms.Tensor(xs[r]), g, counts[r], recv).asnumpy()
        np.testing.assert_array_equal(got, np.concatenate(ref, 0))


def _check_p2p(ctx, world):
    """Ring of pipeline neighbours over the whole world: each rank exchanges with next/prev."""
    import mindspore as ms

    from mcore import comm
    from mcore.parallel_state import ParallelDims
    from mcore.rank_layout import RankLayout

    pp = ParallelDims.from_layout(RankLayout(world=world.size, pp=world.size), world.global_rank,
                                  create_groups=True)
    me, P = pp.pp_stage, world.size
    fwd = _data(me, (2, 3), salt=11)   # activation to the next stage
    bwd = _data(me, (5,), salt=12)     # gradient to the previous stage
    with ctx.check("p2p_send_forward_recv_backward"):
        # Stage s: send activation to s+1 and receive s+1's gradient in the same call.
        if me < P - 1:
            got = comm.exchange(ms.Tensor(fwd), (5,), pp.pp_next_pair)
            np.testing.assert_array_equal(got.asnumpy(), _data(me + 1, (5,), salt=12))
        if me > 0:
            got = comm.exchange(ms.Tensor(bwd), (2, 3), pp.pp_prev_pair)
            np.testing.assert_array_equal(got.asnumpy(), _data(me - 1, (2, 3), salt=11))
    with ctx.check("p2p_send_recv"):
        if me % 2 == 0 and me + 1 < P:
            comm.send(ms.Tensor(fwd), pp.pp_next_pair)
        elif me % 2 == 1:
            got = comm.recv((2, 3), pp.pp_prev_pair)
            np.testing.assert_array_equal(got.asnumpy(), _data(me - 1, (2, 3), salt=11))


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def job(request):
    return run_ranks(request.param, "tests.mcore.test_comm:_worker", timeout=400)


@pytest.mark.parametrize("name", [
    "all_reduce_sum", "all_reduce_max", "all_reduce_min", "all_gather", "reduce_scatter",
    "all_to_all_s", "all_to_all_uneven", "broadcast", "barrier", "p2p_", "size_one",
])
def test_collective_matches_numpy(job, name):
    job.assert_ok(name)


@pytest.mark.parametrize("form", ["identity", "allreduce", "allgather", "reducescatter", "split",
                                  "alltoall"])
def test_differentiable_form_gradient_matches_numpy(job, form):
    job.assert_ok(f"grad_{form}_")


def test_both_modes_and_subgroups_ran(job):
    for mode in ("pynative", "jit"):
        job.assert_ok(f"all_gather_dim1_{mode}_tp2")
    if job.nranks == 4:
        job.assert_ok("all_gather_dim1_jit_world4")
        job.assert_ok("all_to_all_s0c1_jit_dp2")
