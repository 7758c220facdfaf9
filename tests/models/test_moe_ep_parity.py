"""Mixtral and Qwen3-MoE at ep=2, and at tp=2 (etp=2, then etp=1), on two real ranks (one
launch for every check).

Rank ``r`` loads a copy of each fixture in which the experts of the OTHER rank hold NaN: a
load that read them would fail (``LoadError``: NaN), so a successful load shows that the rank
read only its own experts ``[2r, 2r + 2)``. It then checks logits against transformers and the
ep=1 model, the greedy continuation, and ``save_pretrained`` (experts gathered over ep, ep
rank 0 writes): the written checkpoint equals the original fixture, names and values, so the
NaN tensors were never used.

At tp=2 (Mixtral: etp=2 and etp=1; Qwen3-MoE: etp=2) every rank holds its tp shard of each
dense tensor and all experts; with etp=2 each expert's etp slice (gate and up rows split
separately, down columns), equal to the slice of the ep=1 model's experts. Logits equal the one-process model's, the greedy continuation
(one token per step: not a multiple of tp, padded inside the MoE layer) transformers', and
``save_pretrained`` (gathered over tp, etp) writes the original fixture back.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks


FAMILIES = ["mixtral", "qwen3_moe"]
TP_LAYOUTS = {"mixtral": (2, 1), "qwen3_moe": (2,)}  # etp at tp=2 (the MoE code is shared)


def _poisoned_copy(src, dst, rank: int, num_experts: int, ep: int):
    """``src`` written to ``dst`` (float32) with NaN in every expert tensor not on ``rank``."""
    import re
    import shutil

    from models.safetensors_io import read_checkpoint, write_checkpoint

    per = num_experts // ep
    tensors = {}
    for name, lazy in read_checkpoint(src).items():
        value = lazy.load()
        match = re.search(r"\.experts\.(\d+)\.", name)
        if match and int(match.group(1)) // per != rank:
            value = np.full_like(value, np.nan)
        tensors[name] = value
    dst.mkdir(parents=True)
    write_checkpoint(dst, tensors)
    shutil.copy(src / "config.json", dst / "config.json")


def _check_tp(ctx, family, fixtures, world, etp: bool):
    import dataclasses

    import models
    from mcore.parallel_state import ModelGroups

    tag = f"{family}_tp2_etp{2 if etp else 1}"
    ref = np.load(fixtures / family / "reference.npz")
    tp = dataclasses.replace(world, kind="tp")
    groups = ModelGroups(tp=tp, etp=dataclasses.replace(world, kind="etp") if etp else
                         ModelGroups().etp)
    one = models.from_pretrained(fixtures / family)
    two = models.from_pretrained(fixtures / family, groups=groups)
    with ctx.check(f"{tag}_loads_its_slices"):
        params, full = dict(two.parameters_and_names()), dict(one.parameters_and_names())
        fc1, fc2 = (f"decoder.layers.1.mlp.experts.{w}" for w in ("fc1", "fc2"))
        want1, want2 = full[fc1].asnumpy(), full[fc2].asnumpy()  # [E, h, 2f], [E, f, h]
        if etp:
            r = world.rank
            want1 = np.concatenate([np.split(g, 2, -1)[r] for g in np.split(want1, 2, -1)], -1)
            want2 = np.split(want2, 2, 1)[r]
        np.testing.assert_array_equal(params[fc1].asnumpy(), want1)
        np.testing.assert_array_equal(params[fc2].asnumpy(), want2)
        qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
        assert params[qkv].shape[0] * 2 == full[qkv].shape[0]
    _check_outputs(ctx, tag, two, one, ref, fixtures / family, writer=world.rank == 0)


def _check_outputs(ctx, tag: str, two, one, ref: dict, source, writer: bool):
    """``two`` (a parallel model) gives ``one``'s logits and transformers' logits and greedy
    tokens, and ``save_pretrained`` writes exactly ``source`` back (from ``writer`` only)."""
    import tempfile
    from pathlib import Path

    import mindspore as ms

    import models
    from models.safetensors_io import read_checkpoint

    ids = ms.Tensor(ref["input_ids"])
    with ctx.check(f"{tag}_logits"):
        got = two(ids).asnumpy()
        np.testing.assert_allclose(got, one(ids).asnumpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=1e-4)
    with ctx.check(f"{tag}_greedy"):
        got = models.generate(two, ref["input_ids"], max_new_tokens=8)
        np.testing.assert_array_equal(np.array(got), ref["greedy"])
    with ctx.check(f"{tag}_save_pretrained"):
        out = Path(tempfile.mkdtemp(prefix=f"{tag}_save_"))
        two.save_pretrained(out)
        if writer:
            original, saved = read_checkpoint(source), read_checkpoint(out)
            assert set(saved) == set(original)
            for name, lazy in saved.items():
                np.testing.assert_array_equal(lazy.load(), original[name].load(), name)
        else:
            assert not list(out.iterdir()), "only the first rank writes"


def _worker(ctx):
    import tempfile
    from pathlib import Path

    import models
    from mcore.parallel_state import ParallelDims

    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
    dims = ParallelDims.build(ep=2)
    rank = dims.ep.rank
    for family in FAMILIES:
        ref = np.load(fixtures / family / "reference.npz")
        poisoned = Path(tempfile.mkdtemp(prefix=f"ep2_{family}_")) / "hf"
        _poisoned_copy(fixtures / family, poisoned, rank, 4, 2)
        one = models.from_pretrained(fixtures / family)
        two = models.from_pretrained(poisoned, dims=dims)
        with ctx.check(f"{family}_reads_only_local_experts"):
            params = dict(two.parameters_and_names())
            full = dict(one.parameters_and_names())
            name = "decoder.layers.1.mlp.experts.fc1"
            assert params[name].shape[0] == 2, params[name].shape
            np.testing.assert_array_equal(params[name].asnumpy(),
                                          full[name].asnumpy()[2 * rank:2 * rank + 2])
        _check_outputs(ctx, family, two, one, ref, fixtures / family, writer=rank == 0)
        for etp in TP_LAYOUTS[family]:
            _check_tp(ctx, family, fixtures, dims.ep, etp == 2)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_poisoned_copy_is_refused_where_all_experts_are_read(tmp_path, rank):
    """The NaN experts of ``_poisoned_copy`` are caught by a load that reads them (ep=1), so the
    ep=2 load succeeding means it did not read them."""
    from pathlib import Path

    import mindspore as ms
    ms.set_device("CPU")
    import models

    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
    _poisoned_copy(fixtures / "mixtral", tmp_path / "hf", rank, 4, 2)
    other = 2 * (1 - rank)
    with pytest.raises(models.LoadError, match=rf"experts\.{other}\.w1\.weight' holds \d+ NaN"):
        models.from_pretrained(tmp_path / "hf")


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.models.test_moe_ep_parity:_worker", timeout=400,
                     stall_timeout=90)


@pytest.mark.multirank
@pytest.mark.parametrize("family", FAMILIES)
def test_ep2_matches_transformers_and_reads_only_local_experts(job, family):
    job.assert_ok(f"{family}_reads")
    for check in ("logits", "greedy", "save_pretrained"):
        job.assert_ok(f"{family}_{check}")


@pytest.mark.multirank
@pytest.mark.parametrize("family,etp", [(f, e) for f in FAMILIES for e in TP_LAYOUTS[f]])
def test_tp2_matches_one_process_and_loads_its_slices(job, family, etp):
    for check in ("loads_its_slices", "logits", "greedy", "save_pretrained"):
        job.assert_ok(f"{family}_tp2_etp{etp}_{check}")
