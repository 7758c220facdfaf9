"""pp=2 x tp=2 on 4 real ranks: 1F1B over a stack of tensor-parallel blocks (column -> row
parallel MLP, split 3 + 1) equals the single-process tp=1 model over 3 SGD steps: loss on every
rank, gradients reassembled over tp shards and pp stages. One launch (``_worker``)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = [pytest.mark.multirank, pytest.mark.slow]  # 4 ranks: 45 s idle, ~115 s under load

STEPS, M, MBS, SEQ, HIDDEN = 3, 4, 2, 8, 16


def _rel(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def _worker(ctx):
    import mindspore as ms

    from mcore.parallel_state import ParallelDims, ProcessGroup
    from mcore.pipeline_parallel.schedule_order import inflight_bound, schedule_orders
    from mcore.pipeline_parallel.schedules import get_forward_backward_func
    from mcore.pipeline_parallel.stage import build_pipeline_model
    from mcore.tensor_parallel.sharding import shard
    from tests.mcore.pipeline import tiny_stack as T

    dims = ParallelDims.build(tp=2, pp=2)
    tp, rank = dims.tp, dims.pp_stage
    embed, blocks, head = T.make_tp_cells(tp)
    keys, split = T.param_keys(embed, blocks, head), T.tp_split_dims(blocks)
    model = build_pipeline_model(embed, blocks, head, T.CrossEntropy(), dims, HIDDEN,
                                 layers_per_stage=[3, 1])
    ref_cells = T.make_tp_cells(ProcessGroup.single("tp"))
    ref_keys = T.param_keys(*ref_cells)
    full = T.Full([ref_cells[0], *ref_cells[1], ref_cells[2]], T.CrossEntropy())
    fb = get_forward_backward_func(2)
    ctx.report("tp_rank", tp.rank)
    for step in range(STEPS):
        micro = T.batches(step, M, MBS, SEQ)
        res = fb(T.forward_step, iter(micro), model, M, SEQ, MBS)
        ref_loss, ref_grads = T.reference_step(full, ref_keys, micro)
        params = [p for chunk in model.chunks for p in chunk.params]
        grads = [g for chunk_grads in res.grads for g in chunk_grads]
        got = {keys[id(p)]: (split.get(id(p)), g.asnumpy()) for p, g in zip(params, grads)}
        ctx.report(f"grads_{step}", got)
        ctx.report(f"ref_grads_{step}", ref_grads)
        with ctx.check(f"tp_pp_loss_step{step}"):
            assert _rel(res.loss, ref_loss) <= 1e-5, (res.loss, ref_loss)
        with ctx.check(f"tp_pp_local_grads_step{step}"):
            bad = {}
            for key, (dim, g) in got.items():
                want = ref_grads[key] if dim is None else shard(ref_grads[key], tp.size,
                                                                tp.rank, dim)
                if _rel(g, want) > 1e-5:
                    bad[key] = _rel(g, want)
            assert got and not bad, bad
        with ctx.check(f"tp_pp_order_and_inflight_step{step}"):
            assert res.trace == schedule_orders(2, 1, M)[rank]
            assert res.peak_inflight <= inflight_bound(2, 1, rank, M)
        for chunk, chunk_grads in zip(model.chunks, res.grads):
            T.sgd(chunk.params, chunk_grads)
        full_params = full.trainable_params()
        T.sgd(full_params, [ms.Tensor(ref_grads[ref_keys[id(p)]]) for p in full_params])


@pytest.fixture(scope="module")
def job():
    return run_ranks(4, "tests.mcore.pipeline.test_pipeline_tp:_worker", timeout=400)


def test_tp_pp_loss_and_local_grads_match_single_process(job):
    job.assert_ok("tp_pp_loss_step")
    job.assert_ok("tp_pp_local_grads_step")
    job.assert_ok("tp_pp_order_and_inflight_step")


def test_tp_pp_gradients_reassembled_over_tp_and_pp(job):
    for step in range(STEPS):
        ref = job.value(f"ref_grads_{step}", 0)
        shards = {}   # key -> {tp rank: (dim, grad)}
        for r in range(4):
            for key, (dim, g) in job.value(f"grads_{step}", r).items():
                shards.setdefault(key, {})[job.value("tp_rank", r)] = (dim, g)
        assert set(shards) == set(ref), f"step {step}: missing {set(ref) - set(shards)}"
        for key, by_tp in shards.items():
            dim = by_tp[0][0]
            parts = [by_tp[t][1] for t in sorted(by_tp)]
            whole = parts[0] if dim is None else np.concatenate(parts, dim)
            if dim is None:
                assert _rel(parts[1], parts[0]) <= 1e-6, f"replicated {key} differs over tp"
            assert _rel(whole, ref[key]) <= 1e-5, f"step {step} param {key}"
