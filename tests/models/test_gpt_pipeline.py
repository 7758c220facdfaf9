"""GPTModel pipeline stages on real ranks equal the single-process full GPTModel.

Tiny Llama (hidden 64, 4 heads, 2 kv heads, vocab 256, ffn 128, 5 layers, seq 16), 3 SGD
steps of 4 micro-batches each, built with ``models.gpt_pipeline.build_gpt_pipeline``: the
loss on every rank and every stage's gradients equal the full model's to 1e-5 relative, the
stages start from the full model's weights under the full model's names, and the gradients
reassembled over pp stages (and tp shards) cover the whole model. One launch per rank count:

- 2 ranks: 1F1B pp=2 split 3 + 2; interleaved pp=2 x vpp=2 split 2 + 1 + 1 + 1; tied
  embeddings at pp=2 split 3 + 2 (the two copies' gradients summed over ``dims.embedding``).
- 4 ranks: pp=2 x tp=2, tied embeddings, split 3 + 2 (gradients reassembled over tp
  shards too; the untied head is one more column-parallel layer, as in every layer).

The full model's trajectory is computed once in this pytest process (``reference``) and
handed to the ranks in a file; each rank also builds the full model itself and checks that it
starts from the same weights. Single-process checks: ``test_gpt_stages.py``.
"""
from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

from tests.models import gpt_pipeline_helpers as H
from tests.multirank import run_ranks


def _run(ctx, tag, dims, ref):
    """Train the pipeline of ``H.CONFIGS`` / ``H.TP_CONFIGS[tag]`` for STEPS steps against
    ``ref`` (the full model's trajectory)."""
    from mcore.pipeline_parallel.schedules import get_forward_backward_func
    from models.gpt_pipeline import build_gpt_pipeline
    from models.weights import split_dims, to_hf

    tie, vpp, split = {**H.CONFIGS, **H.TP_CONFIGS}[tag]
    table = H.table(tie)
    pipe = build_gpt_pipeline(H.hf_config(tie), dims, vpp=vpp, layers_per_stage=split)
    with ctx.check(f"{tag}_names_and_initial_weights"):
        init_hf = to_hf(table, ref["init"])
        for model in pipe.chunk_models:
            held = dict(model.parameters_and_names())
            assert set(held) <= set(ref["init"]), set(held) - set(ref["init"])
            want = H.expected_local(model, init_hf)
            assert set(want) == set(held), set(want) ^ set(held)
            for name, param in held.items():
                np.testing.assert_array_equal(param.asnumpy(), want[name], err_msg=name)
    with ctx.check(f"{tag}_shared_embedding_flags"):
        flagged = [n for m in pipe.chunk_models for n, p in m.parameters_and_names()
                   if getattr(p, "shared_embedding", False)]
        ends = dims.is_first_stage or dims.is_last_stage
        assert flagged == (["embedding.weight"] if tie and ends else []), flagged
    ctx.report("pp_stage", dims.pp_stage)
    ctx.report("tp_rank", dims.tp.rank)
    dims_of = {}
    for model in pipe.chunk_models:
        dims_of.update(split_dims(model))
    fb = get_forward_backward_func(dims.pp.size, vpp)
    for step in range(H.STEPS):
        start = time.perf_counter()
        res = fb(H.forward_step, iter(H.batches(step)), pipe, H.M, H.SEQ, H.MBS)
        grads = pipe.sync_embedding_grads(res.grads)
        got = {name: g.asnumpy().copy() for names, gs in zip(pipe.param_names, grads)
               for name, g in zip(names, gs)}
        ctx.report(f"{tag}_seconds_step{step}", time.perf_counter() - start)
        ctx.report(f"{tag}_grads_{step}", {n: (dims_of.get(n), g) for n, g in got.items()})
        ref_loss, ref_grads = ref["steps"][step]
        with ctx.check(f"{tag}_loss_step{step}"):
            assert H.rel(res.loss, ref_loss) <= 1e-5, (res.loss, ref_loss)
        with ctx.check(f"{tag}_local_grads_step{step}"):
            ref_hf = to_hf(table, ref_grads)
            bad = {}
            for model in pipe.chunk_models:
                for name, want in H.expected_local(model, ref_hf).items():
                    if H.rel(got[name], want) > 1e-5:
                        bad[name] = H.rel(got[name], want)
            assert got and not bad, bad
        for chunk, chunk_grads in zip(pipe.chunks, grads):
            H.sgd(chunk.params, chunk_grads)


def _load_references(ctx) -> dict:
    """The full model's trajectory (from the pytest process); the full model built here, on
    this rank, must start from the same weights."""
    import models

    with open(ctx.args[0], "rb") as f:
        refs = pickle.load(f)
    with ctx.check("full_model_on_this_rank_equals_reference_init"):
        for tie, ref in refs.items():
            full = models.build_from_config(H.hf_config(tie))
            for name, param in full.parameters_and_names():
                np.testing.assert_array_equal(param.asnumpy(), ref["init"][name], err_msg=name)
    return refs


def _worker(ctx):
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(pp=2)
    refs = _load_references(ctx)
    for tag, (tie, _, _) in H.CONFIGS.items():
        _run(ctx, tag, dims, refs[tie])


def _tp_worker(ctx):
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(tp=2, pp=2)
    refs = _load_references(ctx)
    for tag, (tie, _, _) in H.TP_CONFIGS.items():
        _run(ctx, tag, dims, refs[tie])


def _check_reassembled(job, refs, tags):
    """Every stage's gradients, reassembled over tp shards and pp stages, give the full model's
    gradient of every parameter (tied: both copies of the embedding equal the full one)."""
    from models.weights import to_hf

    for tag in tags:
        tie = {**H.CONFIGS, **H.TP_CONFIGS}[tag][0]
        table = H.table(tie)
        for step in range(H.STEPS):
            ref_grads = refs[tie]["steps"][step][1]
            copies = {}   # (name, pp stage) -> {tp rank: (split dim, grad)}
            for r in range(job.nranks):
                stage, tp_rank = job.value("pp_stage", r), job.value("tp_rank", r)
                for name, (dim, g) in job.value(f"{tag}_grads_{step}", r).items():
                    copies.setdefault((name, stage), {})[tp_rank] = (dim, g)
            assert {n for n, _ in copies} == set(ref_grads), f"{tag} step {step}: coverage"
            tp = max(len(by_tp) for by_tp in copies.values())
            want = to_hf(table, ref_grads)
            for (name, stage), by_tp in copies.items():
                dim = by_tp[0][0]
                parts = [by_tp[t][1] for t in sorted(by_tp)]
                if dim is None:
                    assert all(H.rel(p, parts[0]) <= 1e-6 for p in parts), f"{name} differs on tp"
                whole = parts[0] if dim is None else np.concatenate(parts, dim)
                got = to_hf({name: table[name]}, {name: whole}, {name: dim}, tp)
                for hf_name, value in got.items():
                    err = H.rel(value, want[hf_name])
                    assert err <= 1e-5, f"{tag} step {step} {name} (stage {stage}): {err}"


@pytest.fixture(scope="module")
def references():
    import mindspore as ms

    ms.set_device("CPU")
    return {tie: H.reference(tie) for tie in (False, True)}


@pytest.fixture(scope="module")
def reference_file(references, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_pipeline") / "references.pkl"
    with open(path, "wb") as f:
        pickle.dump(references, f)
    return str(path)


@pytest.fixture(scope="module")
def job2(reference_file):
    return run_ranks(2, "tests.models.test_gpt_pipeline:_worker", args=(reference_file,),
                     timeout=300, stall_timeout=90)


@pytest.fixture(scope="module")
def job4(reference_file):
    return run_ranks(4, "tests.models.test_gpt_pipeline:_tp_worker", args=(reference_file,),
                     timeout=400, stall_timeout=120)


@pytest.mark.multirank
@pytest.mark.parametrize("tag", list(H.CONFIGS))
def test_pp2_stages_match_full_model(job2, tag):
    job2.assert_ok("full_model_on_this_rank")
    job2.assert_ok(f"{tag}_")


@pytest.mark.multirank
def test_pp2_gradients_reassembled_over_stages(job2, references):
    _check_reassembled(job2, references, H.CONFIGS)


@pytest.mark.multirank
@pytest.mark.slow   # 4 ranks on 2 cores: ~50 s idle, ~80 s under load
@pytest.mark.parametrize("tag", list(H.TP_CONFIGS))
def test_pp2_tp2_stages_match_full_model(job4, tag):
    job4.assert_ok("full_model_on_this_rank")
    job4.assert_ok(f"{tag}_")


@pytest.mark.multirank
@pytest.mark.slow
def test_pp2_tp2_gradients_reassembled_over_stages_and_shards(job4, references):
    _check_reassembled(job4, references, H.TP_CONFIGS)
