"""LoRA at tp=2 on two real ranks equals LoRA on one process (one launch).

Each rank builds the Llama fixture with adapters on q/v (column, fused q/k/v), gate (column,
fused gate/up), o and down (row) at tp=1, gives them the same non-zero values and saves them
(PEFT layout), then loads that adapter onto a tp=2 model and onto a tp=2 model with sequence
parallelism. Checked against tp=1: logits, loss, every adapter gradient after the gradient
finaliser (this rank's shard of the tp=1 gradient) and the global gradient norm; the adapter
saved from tp=2 (gathered) equals the one saved from tp=1; merging at tp=2 keeps the logits.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank

TARGETS = ["q_proj", "v_proj", "gate_proj", "o_proj", "down_proj"]


def _grads_and_norm(model, ids, labels, dims):
    """``({name: finalised gradient}, global norm)`` of the mean token loss (trainable only)."""
    import mindspore as ms

    from mcore.distributed.finalize import GradFinalizer, grad_plans
    from training.step import tp_split_names

    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    params = ms.ParameterTuple([p for _, p in named])

    def loss(x, y):
        return model(x, labels=y).mean()

    grads = ms.grad(loss, grad_position=None, weights=params)(ids, labels)
    grads, norm = GradFinalizer(grad_plans(named, tp_split_names(model), dims), dims)(tuple(grads))
    return {n: g.asnumpy() for (n, _), g in zip(named, grads)}, float(norm.asnumpy())


def _check_grads(ctx, tag, model, ids, labels, dims, want, want_norm):
    from models.weights import split_dims
    from mcore.tensor_parallel.sharding import shard

    got, norm = _grads_and_norm(model, ids, labels, dims)
    with ctx.check(f"{tag}_adapter_grads"):
        assert sorted(got) == sorted(want) and all(".lora." in n for n in got)
        split = split_dims(model)
        for name, g in want.items():
            local = g if split.get(name) is None else shard(g, 2, dims.tp.rank, split[name])
            scale = max(np.abs(g).max(), 1e-3)
            np.testing.assert_allclose(got[name], local, rtol=0, atol=1e-5 * scale, err_msg=name)
    with ctx.check(f"{tag}_grad_norm"):
        assert abs(norm - want_norm) <= 1e-5 * want_norm, (norm, want_norm)


def _worker(ctx):
    import tempfile
    from pathlib import Path

    import mindspore as ms

    import models
    from mcore.parallel_state import ParallelDims, ProcessGroup
    from models.peft import apply_lora, load_adapter, merge_lora, save_adapter
    from models.safetensors_io import read_header
    from tests.models.test_lora import FIXTURE, _randomise_adapters
    from tests.models.test_tp_parity import _sp_twin

    dims = ParallelDims.build(tp=2)
    ref = np.load(FIXTURE / "reference.npz")
    ids, labels = ms.Tensor(ref["input_ids"]), ms.Tensor(np.roll(ref["input_ids"], -1, 1))
    one = models.from_pretrained(FIXTURE, tp_group=ProcessGroup.single("tp"))
    apply_lora(one, r=4, alpha=8, target_modules=TARGETS)
    _randomise_adapters(one, seed=5)
    want_logits, want_loss = one(ids).asnumpy(), one(ids, labels=labels).asnumpy()
    want, _ = _grads_and_norm(one, ids, labels, ParallelDims.single())
    want_norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in want.values())))
    tmp = Path(tempfile.mkdtemp(prefix="lora_tp_"))
    save_adapter(one, tmp / "tp1")  # a size-one group: every rank writes its own copy

    two = models.from_pretrained(FIXTURE, dims=dims)
    load_adapter(two, tmp / "tp1")
    with ctx.check("tp2_adapter_shards"):
        shapes = {n: p.shape for n, p in two.parameters_and_names() if ".lora." in n}
        full = {n: p.shape for n, p in one.parameters_and_names() if ".lora." in n}
        assert sorted(shapes) == sorted(full)
        q_b = "decoder.layers.0.self_attention.linear_qkv.lora.parts.0.lora_B"
        o_a = "decoder.layers.0.self_attention.linear_proj.lora.parts.0.lora_A"
        assert shapes[q_b][0] * 2 == full[q_b][0] and shapes[o_a][1] * 2 == full[o_a][1]
    with ctx.check("tp2_logits_and_loss"):
        np.testing.assert_allclose(two(ids).asnumpy(), want_logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(two(ids, labels=labels).asnumpy(), want_loss, rtol=0, atol=1e-5)
    _check_grads(ctx, "tp2", two, ids, labels, dims, want, want_norm)

    sp = _sp_twin(FIXTURE, dims)
    load_adapter(sp, tmp / "tp1")
    with ctx.check("sp_flags"):
        flagged = {n for n, p in sp.parameters_and_names() if getattr(p, "sequence_parallel", 0)
                   and ".lora." in n}
        assert "decoder.layers.0.self_attention.linear_qkv.lora.parts.0.lora_A" in flagged
        assert "decoder.layers.0.mlp.linear_fc2.lora.parts.0.lora_B" in flagged
        assert not any(n.endswith("lora_B") and "linear_qkv" in n for n in flagged), flagged
    with ctx.check("sp_logits_and_loss"):
        np.testing.assert_allclose(sp(ids).asnumpy(), want_logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(sp(ids, labels=labels).asnumpy(), want_loss, rtol=0, atol=1e-5)
    _check_grads(ctx, "sp", sp, ids, labels, dims, want, want_norm)

    with ctx.check("tp2_save_adapter_gathers"):
        out = Path(tempfile.mkdtemp(prefix="lora_tp2_")) if dims.tp.rank == 0 else tmp / "unused"
        save_adapter(two, out)
        if dims.tp.rank == 0:
            saved, original = read_header(out / "adapter_model.safetensors"), \
                read_header(tmp / "tp1" / "adapter_model.safetensors")
            assert sorted(saved) == sorted(original)
            for name, lazy in saved.items():
                np.testing.assert_array_equal(lazy.load(), original[name].load(), name)
    with ctx.check("tp2_merge_keeps_logits"):
        merge_lora(two)
        np.testing.assert_allclose(two(ids).asnumpy(), want_logits, rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.models.test_lora_tp:_worker", timeout=300, stall_timeout=90)


@pytest.mark.parametrize("tag", ["tp2_adapter_shards", "tp2_logits_and_loss", "tp2_adapter_grads",
                                 "tp2_grad_norm", "sp_flags", "sp_logits_and_loss",
                                 "sp_adapter_grads", "sp_grad_norm", "tp2_save_adapter_gathers",
                                 "tp2_merge_keeps_logits"])
def test_lora_tp2_matches_one_process(job, tag):
    job.assert_ok(tag)
