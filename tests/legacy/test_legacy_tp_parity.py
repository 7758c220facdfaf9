"""tp=2 on two real ranks equals tp=1 for the ALiBi (Bloom) and multi-query (GPTBigCode)
families, for four remote-code families: Baichuan2-13B-style (ALiBi with 6 heads, NormHead
rows split over tp), ChatGLM (grouped-query ``query_key_value`` row ranges split per rank),
InternLM2 (``wqkv`` grouped by kv head: each rank takes its groups' query, key and value rows)
and Qwen v1 (``c_attn = [q; k; v]`` with bias, partial rotary), for the encoder-decoder T5 (``t5`` fixture: relative position bias columns, cross-attention
and the tied, scaled head split over tp; padded encoder batch), and for the encoder BERT
(``bert`` fixture: bidirectional post-norm layers, vocab-parallel MLM head tied to the word
embedding; padded, token-typed batch; no greedy check: an encoder does not generate) (one
msrun-style launch, ``tests.multirank.run_ranks``). InternLM2 and Qwen v1 check only what is
theirs, the split on load and the gather on save (logits, loss, ``save_pretrained``): their
layers are ones the other families already check through decoding and gradients.

Each rank loads the family's fixture at tp=1 (a size-one group) and at tp=2 (its shard: half
the query heads and their ALiBi slopes; GPTBigCode's single kv head replicated) and checks
against the tp=1 model (and, for the transformers fixtures, transformers' logits and greedy
tokens; the remote-code checkpoints are the random ones of their numpy tests, written by each
rank): logits and the vocab-parallel loss, KV-cache greedy decoding (2
tokens), ``save_pretrained`` gathering the original tensors, and the gradients of the mean
loss: after the gradient finaliser (``mcore.distributed.finalize``) the global gradient norm
equals the tp=1 norm and every tp-replicated parameter (norms, row-parallel biases, the
replicated ``linear_kv``, whose per-rank gradient covers only that rank's heads) has the tp=1
gradient.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank

FAMILIES = ["bloom", "gpt_bigcode", "baichuan", "chatglm", "internlm2", "qwen", "t5"]
REMOTE_CODE = ("baichuan", "chatglm", "internlm2", "qwen")  # random checkpoints, no fixture
CHECKS = ("logits_and_loss", "greedy", "save_pretrained_gathers", "grad_norm", "replicated_grads")
# Families whose only new tp path is the weight-table split (their layer is one the others
# already check through decoding and gradients): the split and the gather back, cheaply.
LAYOUT_ONLY = {"internlm2": CHECKS[:1] + CHECKS[2:3], "qwen": CHECKS[:1] + CHECKS[2:3]}


def _grads(model, *inputs, loss=None):
    """``[(name, Parameter)]`` and the raw gradients of ``loss(*inputs)`` (default: the mean
    token loss ``model(ids, labels=labels).mean()``)."""
    import mindspore as ms

    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]

    def mean_loss(x, y):
        return model(x, labels=y).mean()

    grads = ms.grad(loss or mean_loss, grad_position=None,
                    weights=ms.ParameterTuple([p for _, p in named]))(*inputs)
    return named, grads


def _check_family(ctx, family, path, dims):
    import mindspore as ms

    import models
    from mcore.parallel_state import ProcessGroup

    one = models.from_pretrained(path, tp_group=ProcessGroup.single("tp"))
    two = models.from_pretrained(path, dims=dims)
    if (path / "reference.npz").exists():
        ref = dict(np.load(path / "reference.npz"))
    else:  # a remote-code checkpoint: tp=1 is the reference (numpy-checked in its own test)
        ids = np.random.default_rng(0).integers(3, one.vocab_size, (2, 8)).astype(np.int32)
        ref = {"input_ids": ids, "logits": one(ms.Tensor(ids)).asnumpy()}
        if family not in LAYOUT_ONLY:
            ref["greedy"] = np.array(models.generate(one, ids, max_new_tokens=2))
    ids = ms.Tensor(ref["input_ids"])
    labels = ms.Tensor(np.roll(ref["input_ids"], -1, 1))
    with ctx.check(f"{family}_logits_and_loss"):
        want = one(ids).asnumpy()
        got = two(ids).asnumpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(two(ids, labels=labels).asnumpy(),
                                   one(ids, labels=labels).asnumpy(), rtol=0, atol=1e-5)
    if family not in LAYOUT_ONLY:
        with ctx.check(f"{family}_greedy"):
            got = models.generate(two, ref["input_ids"], max_new_tokens=2)
            np.testing.assert_array_equal(np.array(got), ref["greedy"][:, :2])
    _check_save(ctx, family, path, dims, two)
    if family not in LAYOUT_ONLY:
        _check_grads(ctx, family, dims, one, two, ids, labels)


def _check_save(ctx, family, path, dims, two):
    """``save_pretrained`` at tp=2 writes back the original tensors (no buffers, no tied head)."""
    import tempfile
    from pathlib import Path

    from models.safetensors_io import read_checkpoint

    with ctx.check(f"{family}_save_pretrained_gathers"):
        out = Path(tempfile.mkdtemp(prefix=f"tp2_{family}_"))
        two.save_pretrained(out)
        if dims.tp.rank == 0:
            original, saved = read_checkpoint(path), read_checkpoint(out)
            buffers = {n for n in original if n.endswith(".inv_freq")}
            tied = {"lm_head.weight"} if two.tie_embeddings else set()
            assert set(saved) == set(original) - tied - buffers, sorted(saved)
            for name, lazy in saved.items():
                np.testing.assert_array_equal(lazy.load(), original[name].load(), name)


def _check_grads(ctx, family, dims, one, two, *inputs, loss=None):
    """The finalised tp=2 gradients of ``loss`` (see ``_grads``) against tp=1: global norm and
    every tp-replicated parameter."""
    from mcore.distributed.finalize import GradFinalizer, grad_plans
    from training.step import tp_split_names

    named_one, grads_one = _grads(one, *inputs, loss=loss and (lambda *a: loss(one, *a)))
    want = {n: g.asnumpy() for (n, _), g in zip(named_one, grads_one)}
    want_norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum())
                                  for g in want.values())))
    named, grads = _grads(two, *inputs, loss=loss and (lambda *a: loss(two, *a)))
    split = tp_split_names(two)
    grads, norm = GradFinalizer(grad_plans(named, split, dims), dims)(tuple(grads))
    with ctx.check(f"{family}_grad_norm"):
        assert abs(float(norm.asnumpy()) - want_norm) <= 1e-5 * want_norm, (norm, want_norm)
    with ctx.check(f"{family}_replicated_grads"):
        replicated = [n for (n, _) in named if n not in split]
        if family == "gpt_bigcode":
            assert "decoder.layers.0.self_attention.linear_kv.weight" in replicated, replicated
        if family == "t5":
            assert "decoder.layers.0.pre_cross_attn_norm.weight" in replicated, replicated
        for (name, _), g in zip(named, grads):
            if name in split:
                continue
            scale = max(np.abs(want[name]).max(), 1e-3)
            np.testing.assert_allclose(g.asnumpy(), want[name], rtol=0, atol=2e-5 * scale,
                                       err_msg=name)


def _check_t5(ctx, path, dims):
    """T5 at tp=2 against tp=1 and transformers: logits, loss, greedy, save, gradients."""
    import tempfile
    from pathlib import Path

    import mindspore as ms

    import models
    from mcore.parallel_state import ProcessGroup
    from models.safetensors_io import read_checkpoint
    from models.t5 import greedy_generate

    one = models.from_pretrained(path, tp_group=ProcessGroup.single("tp"))
    two = models.from_pretrained(path, dims=dims)
    ref = dict(np.load(path / "reference.npz"))
    ids, mask = ms.Tensor(ref["input_ids"]), ms.Tensor(ref["attention_mask"])
    dec, labels = ms.Tensor(ref["decoder_input_ids"]), ms.Tensor(ref["labels"])
    with ctx.check("t5_logits_and_loss"):
        got = two(ids, dec, mask).asnumpy()
        np.testing.assert_allclose(got, one(ids, dec, mask).asnumpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(two(ids, dec, mask, labels).asnumpy(),
                                   one(ids, dec, mask, labels).asnumpy(), rtol=0, atol=1e-5)
    with ctx.check("t5_greedy"):
        got = greedy_generate(two, ref["input_ids"], ref["attention_mask"], max_new_tokens=2)
        np.testing.assert_array_equal(got, ref["greedy"][:, :2])
    with ctx.check("t5_save_pretrained_gathers"):
        out = Path(tempfile.mkdtemp(prefix="tp2_t5_"))
        two.save_pretrained(out)
        if dims.tp.rank == 0:
            original, saved = read_checkpoint(path), read_checkpoint(out)
            assert set(saved) == set(original), sorted(set(saved) ^ set(original))
            for name, lazy in saved.items():
                np.testing.assert_array_equal(lazy.load(), original[name].load(), name)
    _check_grads(ctx, "t5", dims, one, two, ids, dec, mask, labels,
                 loss=lambda model, x, d, m, y: model.loss(x, d, y, m))


def _check_bert(ctx, path, dims):
    """BERT: MLM logits with token types and a padded row, the MLM loss, save, gradients."""
    import mindspore as ms

    import models
    from mcore.parallel_state import ProcessGroup

    one = models.from_pretrained(path, tp_group=ProcessGroup.single("tp"))
    two = models.from_pretrained(path, dims=dims)
    ref = dict(np.load(path / "reference.npz"))
    ids, types, mask = (ms.Tensor(ref[k]) for k in ("input_ids", "token_type_ids",
                                                     "attention_mask"))
    labels = np.where(ref["attention_mask"] > 0, np.roll(ref["input_ids"], 1, 1), -100)
    labels[:, ::3] = -100
    labels = ms.Tensor(labels.astype(np.int32))
    with ctx.check("bert_logits_and_loss"):
        got = two(ids, types, mask).asnumpy()
        np.testing.assert_allclose(got, one(ids, types, mask).asnumpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(two.mlm_loss(ids, labels, types, mask).asnumpy(),
                                   one.mlm_loss(ids, labels, types, mask).asnumpy(), rtol=1e-5)
    _check_save(ctx, "bert", path, dims, two)
    _check_grads(ctx, "bert", dims, one, two, ids, labels,
                 loss=lambda model, x, y: model.mlm_loss(x, y, types, mask))


def _remote_code_checkpoint(family):
    """The random tiny checkpoint of ``tests/legacy/test_<family>.py`` in a fresh directory."""
    import tempfile

    from tests.legacy import remote_checkpoints
    from tests.legacy.remote_ref import write

    rng = np.random.default_rng(5)
    if family == "baichuan":  # the 13B form: ALiBi (6 heads: 3 slopes per rank) + NormHead
        tensors, config = remote_checkpoints.baichuan(rng, 48, 6, "alibi")
    elif family == "chatglm":  # LayerNorm, every bias, 2 kv heads: one per rank
        tensors, config = remote_checkpoints.chatglm(rng, True, True, 50.0)
    elif family == "internlm2":  # wqkv grouped by kv head (2 groups: one per rank), biases
        tensors = remote_checkpoints.internlm2_tensors(rng, True)
        config = remote_checkpoints.internlm2_config(True, None)
    else:  # qwen: c_attn = [q; k; v] with bias, every bias, rotary on half of each head
        tensors = remote_checkpoints.qwen_v1_tensors(rng, True)
        config = remote_checkpoints.qwen_v1_config(True, 0.5)
    return write(tempfile.mkdtemp(prefix=f"tp2_src_{family}_"), config, tensors)


def _worker(ctx):
    from pathlib import Path

    from mcore.parallel_state import ParallelDims

    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
    dims = ParallelDims.build(tp=2)
    for family in FAMILIES:
        if family == "t5":
            _check_t5(ctx, fixtures / "t5", dims)
            continue
        path = _remote_code_checkpoint(family) if family in REMOTE_CODE else fixtures / family
        _check_family(ctx, family, path, dims)
    _check_bert(ctx, fixtures / "bert", dims)


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.legacy.test_legacy_tp_parity:_worker", timeout=420,
                     stall_timeout=120)


@pytest.mark.parametrize("family,check", [(f, c) for f in FAMILIES
                                          for c in LAYOUT_ONLY.get(f, CHECKS)])
def test_tp2_matches_tp1(job, family, check):
    job.assert_ok(f"{family}_{check}")


@pytest.mark.parametrize("check", ["logits_and_loss", "save_pretrained_gathers", "grad_norm",
                                   "replicated_grads"])
def test_bert_tp2_matches_tp1(job, check):
    job.assert_ok(f"bert_{check}")
