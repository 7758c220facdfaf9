"""Pipeline schedules on 2 real ranks equal the single-process run (loss and reassembled
gradients, 3 SGD steps), follow the textbook orders, stay within the 1F1B memory bound, and a
rank failing mid-schedule ends the job promptly.

One launch runs every check (``_worker``): 1F1B (pp=2, layers split 4 + 2), interleaved
(pp=2 x vpp=2, split 2 + 1 + 2 + 1), their forward-only forms, and no-pipelining (pp=1) on a
world-of-one ``ParallelDims``. A second, short launch injects a failure.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from tests.multirank import RankFailure, run_ranks

pytestmark = pytest.mark.multirank

CONFIGS = {  # tag: (pp, vpp, layers_per_stage, num_microbatches)
    "1f1b": (2, 1, [4, 2], 4),
    "interleaved": (2, 2, [2, 1, 2, 1], 4),
    "nopipe": (1, 1, None, 3),
}
STEPS, MBS, SEQ, HIDDEN = 3, 2, 8, 16


def _rel(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def _run_config(ctx, tag, dims):
    import mindspore as ms

    from mcore.pipeline_parallel.schedule_order import inflight_bound, schedule_orders
    from mcore.pipeline_parallel.schedules import get_forward_backward_func
    from mcore.pipeline_parallel.stage import build_pipeline_model
    from tests.mcore.pipeline import tiny_stack as T

    pp, vpp, split, m = CONFIGS[tag]
    embed, blocks, head = T.make_cells()
    keys = T.param_keys(embed, blocks, head)
    model = build_pipeline_model(embed, blocks, head, T.CrossEntropy(), dims, HIDDEN, vpp=vpp,
                                 layers_per_stage=split)
    ref_cells = T.make_cells()
    ref_keys = T.param_keys(*ref_cells)
    full = T.Full([ref_cells[0], *ref_cells[1], ref_cells[2]], T.CrossEntropy())
    fb = get_forward_backward_func(pp, vpp)
    rank = dims.pp_stage
    for step in range(STEPS):
        micro = T.batches(step, m, MBS, SEQ)
        res = fb(T.forward_step, iter(micro), model, m, SEQ, MBS)
        ref_loss, ref_grads = T.reference_step(full, ref_keys, micro)
        got = {keys[id(p)]: g.asnumpy() for chunk, grads in zip(model.chunks, res.grads)
               for p, g in zip(chunk.params, grads)}
        ctx.report(f"{tag}_grads_{step}", got)
        ctx.report(f"{tag}_ref_grads_{step}", ref_grads)
        with ctx.check(f"{tag}_loss_step{step}"):
            assert _rel(res.loss, ref_loss) <= 1e-5, (res.loss, ref_loss)
        with ctx.check(f"{tag}_local_grads_step{step}"):
            bad = {k: _rel(g, ref_grads[k]) for k, g in got.items() if _rel(g, ref_grads[k]) > 1e-5}
            assert got and not bad, bad
        with ctx.check(f"{tag}_order_step{step}"):
            assert res.trace == schedule_orders(pp, vpp, m)[rank], res.trace
        with ctx.check(f"{tag}_inflight_step{step}"):
            assert res.peak_inflight <= inflight_bound(pp, vpp, rank, m), res.peak_inflight
            ctx.report(f"{tag}_peak", res.peak_inflight)
        for chunk, grads in zip(model.chunks, res.grads):
            T.sgd(chunk.params, grads)
        full_params = full.trainable_params()
        T.sgd(full_params, [ms.Tensor(ref_grads[ref_keys[id(p)]]) for p in full_params])
    micro = T.batches(STEPS, m, MBS, SEQ)
    res = fb(T.forward_step, iter(micro), model, m, SEQ, MBS, forward_only=True)
    with ctx.check(f"{tag}_forward_only"):
        ref_loss, _ = T.reference_step(full, ref_keys, micro)
        assert _rel(res.loss, ref_loss) <= 1e-5, (res.loss, ref_loss)
        assert res.trace == schedule_orders(pp, vpp, m, forward_only=True)[rank]
        assert not any(g is not None for g in res.grads)


def _check_p2p(ctx, dims):
    """Megatron-named ops pair up across the two stages; exchange_shapes learns a shape."""
    import mindspore as ms

    from mcore.pipeline_parallel import p2p

    def data(stage, salt, shape):
        return np.random.default_rng(10 * stage + salt).standard_normal(shape).astype(np.float32)

    act, grad = (2, 3, 4), (2, 3, 4)
    first = dims.is_first_stage
    with ctx.check("p2p_send_recv_forward_backward"):
        if first:
            p2p.send_forward(ms.Tensor(data(0, 1, act)), dims)
            got = p2p.recv_backward(grad, dims).asnumpy()
            np.testing.assert_array_equal(got, data(1, 2, grad))
            assert p2p.recv_forward(act, dims) is None       # nothing before the first stage
        else:
            got = p2p.recv_forward(act, dims).asnumpy()
            np.testing.assert_array_equal(got, data(0, 1, act))
            p2p.send_backward(ms.Tensor(data(1, 2, grad)), dims)
            assert p2p.recv_backward(grad, dims) is None     # nothing after the last stage
    with ctx.check("p2p_combined_ops"):
        if first:
            got = p2p.send_forward_recv_backward(ms.Tensor(data(0, 3, act)), grad, dims)
            np.testing.assert_array_equal(got.asnumpy(), data(1, 4, grad))
        else:
            got = p2p.send_backward_recv_forward(ms.Tensor(data(1, 4, grad)), act, dims)
            np.testing.assert_array_equal(got.asnumpy(), data(0, 3, act))
    with ctx.check("p2p_exchange_shapes_then_tensor"):
        varying = (1, 5, 4)   # e.g. a shorter sequence this micro-batch
        if first:
            assert p2p.exchange_shapes(varying, dims.pp_next_pair, expect=False) is None
            p2p.communicate([ms.Tensor(data(0, 5, varying))], [], dims.pp_next_pair)
        else:
            shape = p2p.exchange_shapes(None, dims.pp_prev_pair)
            assert shape == varying, shape
            got = p2p.communicate([], [shape], dims.pp_prev_pair)[0]
            np.testing.assert_array_equal(got.asnumpy(), data(0, 5, varying))


def _worker(ctx):
    import mindspore as ms

    from mcore.parallel_state import ParallelDims
    from mcore.pipeline_parallel.stage import sync_embedding_grads

    dims = ParallelDims.build(pp=2)
    _check_p2p(ctx, dims)
    with ctx.check("tied_embedding_grads_summed_over_first_and_last_stage"):
        mine = np.full((3, 2), 1.0 + dims.pp_stage, np.float32)
        got = sync_embedding_grads((ms.Tensor(mine),), dims)[0].asnumpy()
        np.testing.assert_array_equal(got, np.full((3, 2), 3.0, np.float32))
    for tag in ("1f1b", "interleaved"):
        _run_config(ctx, tag, dims)
    _run_config(ctx, "nopipe", ParallelDims.single())


def _failing_worker(ctx):
    """Rank 1 raises while fetching its third micro-batch; rank 0 is then blocked in an
    exchange that will never be matched."""
    from mcore.parallel_state import ParallelDims
    from mcore.pipeline_parallel.schedules import get_forward_backward_func
    from mcore.pipeline_parallel.stage import build_pipeline_model
    from tests.mcore.pipeline import tiny_stack as T

    dims = ParallelDims.build(pp=2)
    embed, blocks, head = T.make_cells()
    model = build_pipeline_model(embed, blocks, head, T.CrossEntropy(), dims, HIDDEN,
                                 layers_per_stage=[4, 2])
    calls = []

    def forward_step(data_iterator, chunk):
        calls.append(1)
        if dims.pp_stage == 1 and len(calls) == 3:
            raise RuntimeError("injected failure in forward_step on the last stage")
        return next(data_iterator)

    get_forward_backward_func(2)(forward_step, iter(T.batches(0, 8, MBS, SEQ)), model, 8, SEQ, MBS)


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.mcore.pipeline.test_pipeline_ranks:_worker", timeout=300)


@pytest.mark.parametrize("tag", list(CONFIGS))
def test_loss_matches_single_process_every_step(job, tag):
    job.assert_ok(f"{tag}_loss_step")
    job.assert_ok(f"{tag}_local_grads_step")


@pytest.mark.parametrize("tag", list(CONFIGS))
def test_reassembled_gradients_match_single_process(job, tag):
    nranks = CONFIGS[tag][0]
    for step in range(STEPS):
        ref = job.value(f"{tag}_ref_grads_{step}", 0)
        merged = {}
        for rank in range(nranks):
            got = job.value(f"{tag}_grads_{step}", rank)
            assert not set(got) & set(merged), f"step {step}: a parameter lives on two ranks"
            merged.update(got)
        assert set(merged) == set(ref), f"step {step}: missing {set(ref) - set(merged)}"
        for key, want in ref.items():
            assert _rel(merged[key], want) <= 1e-5, f"step {step} param {key}"


@pytest.mark.parametrize("tag", list(CONFIGS))
def test_order_matches_textbook_and_inflight_within_bound(job, tag):
    job.assert_ok(f"{tag}_order_step")
    job.assert_ok(f"{tag}_inflight_step")
    job.assert_ok(f"{tag}_forward_only")


def test_p2p_ops_pair_up_between_neighbours(job):
    job.assert_ok("p2p_")


def test_tied_embedding_grads_are_synced(job):
    job.assert_ok("tied_embedding_grads")


def test_peak_inflight_is_the_1f1b_bound_not_all_microbatches(job):
    assert [job.value("1f1b_peak", r) for r in range(2)] == [2, 1]        # m = 4
    assert [job.value("interleaved_peak", r) for r in range(2)] == [5, 3]  # of 8 virtual


def test_rank_failing_mid_schedule_fails_the_job_promptly():
    start = time.time()
    with pytest.raises(RankFailure) as info:
        run_ranks(2, "tests.mcore.pipeline.test_pipeline_ranks:_failing_worker", timeout=120,
                  stall_timeout=40)
    message = str(info.value)
    assert "rank 1 of 2 failed first" in message and "injected failure" in message, message
    assert time.time() - start < 60
