"""tp=2 on two real ranks equals tp=1 for the ALiBi (Bloom) and multi-query (GPTBigCode)
families, and for four remote-code families: Baichuan2-13B-style (ALiBi with 6 heads, NormHead
rows split over tp), ChatGLM (grouped-query ``query_key_value`` row ranges split per rank),
InternLM2 (``wqkv`` grouped by kv head: each rank takes its groups' query, key and value rows)
and Qwen v1 (``c_attn = [q; k; v]`` with bias, partial rotary) (one msrun-style launch,
``tests.multirank.run_ranks``). InternLM2 and Qwen v1 check only what is theirs, the split on
load and the gather on save (logits, loss, ``save_pretrained``): their layers are ones the
other families already check through decoding and gradients.

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

FAMILIES = ["bloom", "gpt_bigcode", "baichuan", "chatglm", "internlm2", "qwen"]
REMOTE_CODE = ("baichuan", "chatglm", "internlm2", "qwen")  # random checkpoints, no fixture
CHECKS = ("logits_and_loss", "greedy", "save_pretrained_gathers", "grad_norm", "replicated_grads")
# Families whose only new tp path is the weight-table split (their layer is one the others
# already check through decoding and gradients): the split and the gather back, cheaply.
LAYOUT_ONLY = {"internlm2": CHECKS[:1] + CHECKS[2:3], "qwen": CHECKS[:1] + CHECKS[2:3]}


def _grads(model, ids, labels):
    """``[(name, Parameter)]`` and the raw gradients of the mean token loss."""
    import mindspore as ms

    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]

    def loss(x, y):
        return model(x, labels=y).mean()

    grads = ms.grad(loss, grad_position=None, weights=ms.ParameterTuple([p for _, p in named]))(
        ids, labels)
    return named, grads


def _check_family(ctx, family, path, dims):
    import tempfile
    from pathlib import Path

    import mindspore as ms

    import models
    from mcore.distributed.finalize import GradFinalizer, grad_plans
    from mcore.parallel_state import ProcessGroup
    from models.safetensors_io import read_checkpoint
    from training.step import tp_split_names

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
    if family in LAYOUT_ONLY:
        return
    named_one, grads_one = _grads(one, ids, labels)
    want = {n: g.asnumpy() for (n, _), g in zip(named_one, grads_one)}
    want_norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum())
                                  for g in want.values())))
    named, grads = _grads(two, ids, labels)
    split = tp_split_names(two)
    grads, norm = GradFinalizer(grad_plans(named, split, dims), dims)(tuple(grads))
    with ctx.check(f"{family}_grad_norm"):
        assert abs(float(norm.asnumpy()) - want_norm) <= 1e-5 * want_norm, (norm, want_norm)
    with ctx.check(f"{family}_replicated_grads"):
        replicated = [n for (n, _) in named if n not in split]
        if family == "gpt_bigcode":
            assert "decoder.layers.0.self_attention.linear_kv.weight" in replicated, replicated
        for (name, _), g in zip(named, grads):
            if name in split:
                continue
            scale = max(np.abs(want[name]).max(), 1e-3)
            np.testing.assert_allclose(g.asnumpy(), want[name], rtol=0, atol=2e-5 * scale,
                                       err_msg=name)


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
        path = _remote_code_checkpoint(family) if family in REMOTE_CODE else fixtures / family
        _check_family(ctx, family, path, dims)


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.legacy.test_legacy_tp_parity:_worker", timeout=420,
                     stall_timeout=120)


@pytest.mark.parametrize("family,check", [(f, c) for f in FAMILIES
                                          for c in LAYOUT_ONLY.get(f, CHECKS)])
def test_tp2_matches_tp1(job, family, check):
    job.assert_ok(f"{family}_{check}")
