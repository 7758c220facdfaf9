"""tp=2 on two real ranks gives the same results as tp=1, for every family (one launch).

Each rank loads every fixture twice: at tp=1 (a size-one group, no communication) and at
tp=2 (its shard of every tensor), then checks logits, the vocab-parallel loss, KV-cache
decoding (2 greedy tokens) and save_pretrained (gathered over tp) against the tp=1 model.

Sequence parallelism, in the same launch (``SP_FAMILIES``): each family's tp=2 model built with
``parallel.sequence_parallel`` (same weights) gives the tp=2 logits, loss and, after the gradient
finaliser (``mcore.distributed.finalize``: flagged norms and row-parallel biases summed over tp),
the same gradient for every parameter; its parameter names and shapes are the plain model's;
KV-cache decoding with it is refused with a message. The same families' tp-replicated
parameters (norms, row-parallel biases, Qwen3's q/k norms) get the tp=1 gradient at tp=2 after
the finaliser.

Multi-token prediction, in the same launch: three training steps of a tiny model with two MTP
depths at tp=2 give the one-process losses, gradient norms and MTP losses.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.models.test_gpt_mtp import check_mtp_tp_parity
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank

FAMILIES = ["llama", "qwen2", "qwen3", "glm", "glm4", "telechat"]
# Sequence parallelism (the plain llama stack trains with it in tests/training/): qk-norm,
# sandwich norms + qkv bias, row-parallel biases.
SP_FAMILIES = ["qwen3", "glm4", "telechat"]


def _cross_entropy(logits, labels):
    """Per-token cross-entropy [b, s] of logits [b, s, V] (float64 numpy)."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def _sp_twin(path, dims):
    """The tp=2 model of the fixture at ``path`` built with sequence parallelism."""
    import dataclasses

    from mcore.parallel_state import ModelGroups
    from mcore.transformer.config import ParallelConfig
    from models.gpt import GPTModel
    from models.hf import HFInfo, family_of, load_weights, read_config
    from models.safetensors_io import read_checkpoint

    hf = read_config(path)
    family = family_of(hf)
    cfg = dataclasses.replace(family.config_from_hf(hf),
                              parallel=ParallelConfig(sequence_parallel=True))
    tie = bool(hf.get("tie_word_embeddings", family.TIE_DEFAULT))
    model = GPTModel(cfg, family.layer_spec(cfg), hf["vocab_size"], tie_embeddings=tie,
                     groups=ModelGroups.from_dims(dims))
    model.hf = HFInfo(family, dict(hf), tie)
    load_weights(model, read_checkpoint(path))
    return model


def _final_grads(model, ids, labels, dims):
    """``{name: gradient}`` of the mean token loss after the gradient finaliser."""
    import mindspore as ms

    from mcore.distributed.finalize import GradFinalizer, grad_plans
    from training.step import tp_split_names

    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    params = ms.ParameterTuple([p for _, p in named])

    def loss(x, y):
        return model(x, labels=y).mean()

    grads = ms.grad(loss, grad_position=None, weights=params)(ids, labels)
    grads, _ = GradFinalizer(grad_plans(named, tp_split_names(model), dims), dims)(tuple(grads))
    return {n: g.asnumpy() for (n, _), g in zip(named, grads)}


def _check_sequence_parallel(ctx, family, path, one, plain, ids, labels, dims):
    import models
    from training.step import tp_split_names

    sp = _sp_twin(path, dims)
    with ctx.check(f"{family}_sp_names_shapes_and_flags"):
        a = {n: p.shape for n, p in plain.parameters_and_names()}
        b = {n: p.shape for n, p in sp.parameters_and_names()}
        assert a == b
        flagged = [n for n, p in sp.parameters_and_names() if getattr(p, "sequence_parallel", False)]
        assert "decoder.final_norm.weight" in flagged and "decoder.layers.0.input_norm.weight" \
            in flagged, flagged
    with ctx.check(f"{family}_sp_logits_and_loss"):
        np.testing.assert_allclose(sp(ids).asnumpy(), plain(ids).asnumpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(sp(ids, labels=labels).asnumpy(),
                                   plain(ids, labels=labels).asnumpy(), rtol=0, atol=1e-5)
    want = _final_grads(plain, ids, labels, dims)
    with ctx.check(f"{family}_replicated_grads_match_tp1"):
        ref = _final_grads(one, ids, labels, dims)  # tp=1: nothing flagged, nothing summed
        replicated = [n for n, g in want.items() if g.shape == ref[n].shape
                      and n not in tp_split_names(plain)]
        assert any("norm" in n for n in replicated), replicated
        for name in replicated:
            scale = max(np.abs(ref[name]).max(), 1e-3)
            np.testing.assert_allclose(want[name], ref[name], rtol=0, atol=2e-5 * scale,
                                       err_msg=name)
    with ctx.check(f"{family}_sp_grads"):
        got = _final_grads(sp, ids, labels, dims)
        assert sorted(got) == sorted(want)
        for name in want:
            scale = max(np.abs(want[name]).max(), 1e-3)
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-5 * scale,
                                       err_msg=name)
    with ctx.check(f"{family}_sp_refuses_kv_cache_decoding"):
        try:
            models.generate(sp, ids.asnumpy(), max_new_tokens=1)
        except ValueError as exc:
            assert "sequence parallelism" in str(exc), exc
        else:
            raise AssertionError("decoding with a sequence-parallel model did not raise")


def _worker(ctx):
    import tempfile
    from pathlib import Path

    import mindspore as ms

    import models
    from mcore.parallel_state import ParallelDims, ProcessGroup
    from models.safetensors_io import read_checkpoint

    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
    dims = ParallelDims.build(tp=2)
    for family in FAMILIES:
        ref = np.load(fixtures / family / "reference.npz")
        ids = ms.Tensor(ref["input_ids"])
        labels = ms.Tensor(np.roll(ref["input_ids"], -1, 1))
        one = models.from_pretrained(fixtures / family, tp_group=ProcessGroup.single("tp"))
        two = models.from_pretrained(fixtures / family, dims=dims)
        with ctx.check(f"{family}_weights_are_sharded"):
            w1 = dict(one.parameters_and_names())["embedding.weight"].shape
            w2 = dict(two.parameters_and_names())["embedding.weight"].shape
            assert w2[0] * 2 == w1[0], (w1, w2)
        want = one(ids).asnumpy()  # tp=1 logits [b, s, V]
        with ctx.check(f"{family}_logits"):
            got = two(ids).asnumpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=1e-4)
        with ctx.check(f"{family}_loss"):
            got = two(ids, labels=labels).asnumpy()  # vocab-parallel cross-entropy [b, s]
            np.testing.assert_allclose(got, _cross_entropy(want, labels.asnumpy()), atol=1e-5)
        with ctx.check(f"{family}_greedy"):
            got = models.generate(two, ref["input_ids"], max_new_tokens=2)
            np.testing.assert_array_equal(np.array(got), ref["greedy"][:, :2])
        with ctx.check(f"{family}_save_pretrained_gathers"):
            out = Path(tempfile.mkdtemp(prefix=f"tp2_{family}_"))
            two.save_pretrained(out)
            if dims.tp.rank == 0:
                original, saved = read_checkpoint(fixtures / family), read_checkpoint(out)
                for name, lazy in saved.items():
                    np.testing.assert_array_equal(lazy.load(), original[name].load(), name)
        if family in SP_FAMILIES:
            _check_sequence_parallel(ctx, family, fixtures / family, one, two, ids, labels, dims)
    check_mtp_tp_parity(ctx, dims)


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.models.test_tp_parity:_worker", timeout=500, stall_timeout=90)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_matches_tp1(job, family):
    job.assert_ok(f"{family}_")


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_tp2_sequence_parallel_matches_tp2(job, family):
    job.assert_ok(f"{family}_sp_")


def test_tp2_mtp_training_matches_tp1(job):
    """Multi-token prediction at tp=2 (``tests/models/test_gpt_mtp.py:check_mtp_tp_parity``)."""
    job.assert_ok("mtp_training_tp2_matches_tp1")


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_tp2_replicated_gradients_match_tp1(job, family):
    """Norm weights, row-parallel biases and Qwen3's q/k norms (tp-replicated): after the
    finaliser, the tp=2 gradient equals the tp=1 one (the q/k norms need the tp sum)."""
    job.assert_ok(f"{family}_replicated_grads_match_tp1")
