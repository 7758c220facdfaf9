"""Gradient finalisation (``mcore.distributed.finalize``) on 2 real ranks, one launch.

Each parameter kind goes through ``GradFinalizer`` (compiled, GRAPH_MODE) under the layout that
exercises it, and the reduced gradients and the global norm equal a numpy reference computed
from every rank's inputs (each rank draws all ranks' gradients from seeds):

- ``dp2``  (dp=2): dense replicated and expert parameters (ep=1: edp=dp=2) -> mean over ranks;
  norm counts each once;
- ``tp2``  (tp=2): a tp-split parameter (norm sums the shards' squares over tp), a replicated
  one, and a sequence-parallel one (summed over tp);
- ``ep2``  (ep=2, dp=2, edp=1): an expert parameter (no sum, ``/ dp``; norm sums over ep) next
  to a dense one (mean over dp);
- ``pp2``  (pp=2): a tied embedding: ``sum_tied_grads`` sums the copies over the embedding
  group (eagerly), the norm counts the first stage's copy only and sums over pp.

Plus single-process checks of ``grad_plan`` (which kind gets which plan, and the one-line error).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

SHAPE = (3, 4)


class _P:
    """A stand-in for a Parameter's attributes (``grad_plan`` reads only these)."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def _g(rank: int, salt: int) -> np.ndarray:
    return np.random.default_rng(1000 * salt + rank).standard_normal(SHAPE).astype(np.float32)


# layout -> (ParallelDims.build kwargs, [(name, attrs, tp_split)])
CASES = {
    "dp2": ({}, [("dense", {}, False), ("expert", {"expert": True}, False)]),
    "tp2": ({"tp": 2}, [("split", {}, True), ("repl", {}, False),
                        ("sp", {"sequence_parallel": True}, False)]),
    "ep2": ({"ep": 2}, [("dense", {}, False), ("expert", {"expert": True}, False)]),
    "pp2": ({"pp": 2}, [("tied", {"shared_embedding": True}, False), ("dense", {}, False)]),
}


def _reference(layout: str, rank: int):
    """(reduced gradients of ``rank``, global norm) in numpy, for 2 ranks."""
    grads = {r: [_g(r, i) for i in range(len(CASES[layout][1]))] for r in (0, 1)}
    both = lambda i: grads[0][i] + grads[1][i]  # noqa: E731
    if layout == "dp2":
        out = [both(0) / 2, both(1) / 2]
        return out, np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in out))
    if layout == "tp2":
        out = [grads[rank][0], grads[rank][1], both(2)]  # dp = 1: no mean
        sq = sum((grads[r][0].astype(np.float64) ** 2).sum() for r in (0, 1))
        sq += (out[1].astype(np.float64) ** 2).sum() + (out[2].astype(np.float64) ** 2).sum()
        return out, np.sqrt(sq)
    if layout == "ep2":
        out = [both(0) / 2, grads[rank][1] / 2]  # expert: edp = 1, scaled by 1 / dp
        sq = (out[0].astype(np.float64) ** 2).sum()
        sq += sum(((grads[r][1] / 2).astype(np.float64) ** 2).sum() for r in (0, 1))
        return out, np.sqrt(sq)
    tied = both(0)  # pp2: the embedding group holds both stages
    out = [tied, grads[rank][1]]
    sq = (tied.astype(np.float64) ** 2).sum()
    sq += sum((grads[r][1].astype(np.float64) ** 2).sum() for r in (0, 1))
    return out, np.sqrt(sq)


def _worker(ctx):
    import mindspore as ms

    from mcore.distributed.finalize import GradFinalizer, grad_plans, sum_tied_grads
    from mcore.parallel_state import ParallelDims
    from mcore.rank_layout import RankLayout

    ms.set_context(mode=ms.GRAPH_MODE)
    first = ParallelDims.build()  # world 2: registers the one 2-rank group every layout uses
    rank = first.global_rank
    for layout, (sizes, params) in CASES.items():
        dims = ParallelDims.from_layout(RankLayout(world=2, **sizes), rank)
        named = [(n, _P(**attrs)) for n, attrs, _ in params]
        plans = grad_plans(named, {n for n, _, split in params if split}, dims)
        grads = [ms.Tensor(_g(rank, i)) for i in range(len(params))]
        with ctx.check(layout):
            grads = sum_tied_grads(grads, plans, dims)
            finalizer = GradFinalizer(plans, dims)
            out, norm = finalizer(tuple(grads))
            want, want_norm = _reference(layout, rank)
            for (name, _, _), got, g, changed in zip(params, out, grads, finalizer.changed):
                if not changed:  # the AdamW kernel path writes back only the changed ones
                    np.testing.assert_array_equal(got.asnumpy(), g.asnumpy(),
                                                  err_msg=f"{layout}: {name} not 'changed'")
            for (name, _, _), got, ref in zip(params, out, want):
                np.testing.assert_allclose(got.asnumpy(), ref, rtol=1e-6, atol=1e-6,
                                           err_msg=f"{layout}: gradient of {name}")
            np.testing.assert_allclose(float(norm.asnumpy()), want_norm, rtol=1e-6,
                                       err_msg=f"{layout}: global norm")


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.mcore.distributed.test_finalize:_worker", timeout=600)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(CASES))
def test_finalizer_matches_numpy_on_two_ranks(job, layout):
    job.assert_ok(layout)


def test_plans_follow_parameter_attributes():
    from mcore.distributed.finalize import grad_plan
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.single()
    assert grad_plan("w", _P(), True, dims).norm == "tp"
    assert grad_plan("b", _P(), False, dims).norm == "local"
    expert = grad_plan("e", _P(expert=True), False, dims)
    assert (expert.reduce, expert.norm) == ("edp", "expert")
    assert grad_plan("e", _P(expert=True), True, dims).norm == "expert_etp"
    assert grad_plan("n", _P(sequence_parallel=True), False, dims).sp_sum
    tied = grad_plan("emb", _P(shared_embedding=True), True, dims)
    assert tied.tied and tied.norm == "tp"  # pp rank 0 counts the tied weight
    with pytest.raises(ValueError, match="parameter w: sequence_parallel"):
        grad_plan("w", _P(sequence_parallel=True), True, dims)
