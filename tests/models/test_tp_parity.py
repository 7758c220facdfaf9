"""tp=2 on two real ranks gives the same results as tp=1, for every family (one launch).

Each rank loads every fixture twice: at tp=1 (a size-one group, no communication) and at
tp=2 (its shard of every tensor), then checks logits, the vocab-parallel loss, KV-cache
decoding (2 greedy tokens) and save_pretrained (gathered over tp) against the tp=1 model.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank

FAMILIES = ["llama", "qwen2", "qwen3", "glm", "glm4", "telechat"]


def _cross_entropy(logits, labels):
    """Per-token cross-entropy [b, s] of logits [b, s, V] (float64 numpy)."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


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


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.models.test_tp_parity:_worker", timeout=400, stall_timeout=90)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_matches_tp1(job, family):
    job.assert_ok(f"{family}_")
