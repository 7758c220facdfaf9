"""Layout-free checkpoints on real ranks: the reshard matrix.

Four saving runs ({tp=2, pp=2, dp=2 + distributed optimizer} in one 2-rank launch, pp=2 x tp=2
on 4 ranks; tied embeddings) each train 2 steps, save, and continue 3 more steps, validation
off (bit-exact resume on the same layout is proven elsewhere, so those are the reference
steps). Then one launch per loading layout ({1 process, tp=2, pp=2}) loads all four
checkpoints in turn into the same, once-built training setup
(``tests/training/reshard_worker.py``): its weights are bit-equal to the slices of the saved
whole model, and its next 3 losses equal the saving run's (1e-5 relative).
``python -m training.export_hf`` writes the pp=2 x tp=2 checkpoint as a Hugging Face directory
that ``models.from_pretrained`` reads back bit for bit.
"""
import json
from pathlib import Path

import pytest

from tests.fresh_process import run_python
from tests.msrun_util import msrun_command, run_msrun, worker_logs
from tests.multirank import REPO_ROOT
from tests.training.runs_worker import launch_by_rank_count

pytestmark = pytest.mark.multirank

WORKER = str(REPO_ROOT / "tests" / "training" / "reshard_worker.py")
TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=32",
        "model.max_position_embeddings=32", "model.tie_word_embeddings=true",
        "data.corpus_max_bytes=200000", "training.micro_batch_size=4",
        "training.global_batch_size=8", "training.train_iters=5", "training.eval_iters=0",
        "optimizer.lr=1e-2", "optimizer.min_lr=1e-3",
        "optimizer.warmup_iters=2", "logging.log_interval=5", "logging.tensorboard=false",
        "logging.sample_tokens=0", "checkpoint.save_interval=2", "checkpoint.keep_last=0"]
SAVE = {"tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]),
        "zero_dp2": (2, ["optimizer.distributed=true", "optimizer.bucket_size=20000"]),
        "pp2_tp2": (4, ["parallel.pp=2", "parallel.tp=2"])}
LOAD = {"one": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"])}


def _args(tmp: Path, run: str, extra) -> list[str]:
    return [*TINY, f"data.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp / run}", *extra]


def _launch(script: str, args, tmp: Path, workers: int) -> None:
    out = run_msrun(msrun_command(script, args, workers=workers), cwd=tmp, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + worker_logs(tmp / "logs")[-4000:]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The saving runs: one launch per rank count (``tests/training/runs_worker.py``)."""
    tmp = tmp_path_factory.mktemp("reshard")
    launch_by_rank_count(tmp, "pretrain", {name: (workers, _args(tmp, f"save_{name}", extra))
                                           for name, (workers, extra) in SAVE.items()}, timeout=600)
    return tmp


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("layout", list(LOAD))
def test_every_saved_layout_loads_into(saved, layout):
    tmp = saved
    workers, extra = LOAD[layout]
    ckpts = ",".join(str(tmp / f"save_{n}" / "checkpoints" / "step_000002") for n in SAVE)
    out = tmp / f"load_{layout}.json"
    args = [str(out), ckpts, *_args(tmp, f"load_{layout}", extra)]
    if workers == 1:
        res = run_python(f"import sys; sys.argv = {[WORKER, *args]!r}; "
                         "from tests.training.reshard_worker import main; main(*sys.argv[1:])",
                         cwd=tmp, timeout=240)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    else:
        _launch(WORKER, args, tmp, workers)
    results = json.loads(out.read_text())
    for name in SAVE:
        got = results[str(tmp / f"save_{name}" / "checkpoints" / "step_000002")]
        assert got["weights_equal"], (name, layout)
        want = _losses(tmp / f"save_{name}")
        for step, loss in got["losses"].items():
            assert abs(loss - want[int(step)]) <= 1e-5 * abs(want[int(step)]), \
                (name, layout, step, want[int(step)], loss)
        assert sorted(map(int, got["losses"])) == [3, 4, 5]


def check_export(tmp: str) -> None:
    """``python -m training.export_hf`` on the pp=2 x tp=2 checkpoint: ``models.from_pretrained``
    of the directory holds the saved whole model, bit for bit (tied embedding included)."""
    import subprocess
    import sys

    import numpy as np

    import models
    from training.checkpointing import load_checkpoint

    ck, out = Path(tmp) / "save_pp2_tp2" / "checkpoints" / "step_000002", Path(tmp) / "hf_export"
    res = subprocess.run([sys.executable, "-m", "training.export_hf", str(ck), str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0 and "exported" in res.stdout, res.stderr[-3000:]
    assert (out / "tokenizer.json").is_file()
    weights = {n: p.asnumpy() for n, p in models.from_pretrained(str(out)).parameters_and_names()}
    saved = load_checkpoint(ck).model
    assert sorted(weights) == sorted(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    print("EXPORT_OK")


def test_export_to_hugging_face(saved):
    res = run_python(f"from tests.training.test_reshard import check_export; check_export({str(saved)!r})",
                     cwd=saved, timeout=300)
    assert res.returncode == 0 and "EXPORT_OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
