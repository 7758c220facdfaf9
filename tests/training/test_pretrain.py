"""training/pretrain.py end to end on a tiny Llama and a slice of the bundled corpus.

- bad configs stop with one line naming the key, exit status 2, before any work;
- one process: the loss falls; 10 steps == 7 steps + stop + resume from step 5 (same losses,
  same weights; the first run sets ``parallel.sp=true``, a logged no-op with tp=1), a
  half-written / corrupted newer checkpoint is skipped by ``load=auto`` with a line naming it,
  and metrics.jsonl / TensorBoard then hold each step once (+ a resumed record);
- a diverging fp32 run skips its non-finite steps, stops with one line (exit status 2) after
  ``training.max_skipped_steps`` of them and keeps its last good checkpoints;
  evaluate.py / generate.py read the checkpoint back (same validation loss, same sample;
  ``training.eval_iters=0`` evaluates the whole validation split);
- real ranks (msrun; every 2-rank run, the ZeRO ones too, in one launch of
  ``tests/training/runs_worker.py``): dp=2, tp=2 and tp=2 with sequence parallelism give the
  single-process per-step losses (1e-5 relative), gradient norms (1e-4; 1e-5 with sp) and
  validation loss (1e-5; dp=2 validates half the micro-batches per rank: the same samples); the
  sp run's checkpoint reads back into a one-process model without sp (generate.py: same
  weights, same sample as the sp run printed through its twin model).
- the distributed optimizer (ZeRO-1): dp=2 and dp=2 x tp=2 (4 ranks, ``training/pretrain.py``
  under msrun) give the single-process losses and gradient norms (1e-5), its moment pieces
  (flat ranges in the checkpoint) read back as the one-process moments, a resume is bit-exact,
  and plain and sharded checkpoints load into each other's runs (one process); these runs turn
  validation off (``training.eval_iters=0``: no validation record, one log line).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.msrun_util import msrun_command, run_msrun, worker_logs
from tests.fresh_process import run_python
from tests.multirank import REPO_ROOT
from tests.training.runs_worker import launch_runs
from tests.training.test_logger import tensorboard_scalars

PRETRAIN = str(REPO_ROOT / "training" / "pretrain.py")
TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=32",
        "model.max_position_embeddings=32", "data.corpus_max_bytes=200000",
        "training.micro_batch_size=4", "training.global_batch_size=8", "training.train_iters=10",
        "training.eval_interval=0", "training.eval_iters=2", "optimizer.lr=1e-2",
        "optimizer.min_lr=1e-3", "optimizer.warmup_iters=2", "logging.log_interval=5",
        "logging.tensorboard=false"]


def _tiny(tmp: Path, run: str, *extra) -> list[str]:
    return [*TINY, f"data.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp / run}", *extra]


def _valid_losses(run_dir: Path) -> list[float]:
    """The run's validation losses from metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["valid_loss"] for r in rows if r["kind"] == "valid"]


def _valid_loss(run_dir: Path) -> float:
    """The run's (one) validation loss."""
    (loss,) = _valid_losses(run_dir)
    return loss


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("override, key", [("model.hidden_sise=64", "model.hidden_sise"),
                                           ("parallel.pp=2", "parallel.pp")])
def test_bad_config_fails_in_one_line_before_work(tmp_path, override, key):
    res = subprocess.run([sys.executable, PRETRAIN, "--config", str(REPO_ROOT / "configs/tiny_llama_demo.yaml"),
                          override, f"logging.output_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and key in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def check_single_process(tmp: str) -> None:
    """Run in a fresh process (the execution mode is process-global)."""
    import shutil

    from training.checkpointing import load_checkpoint
    from training.config import load_config
    from training.pretrain import run

    tmp = Path(tmp)
    # parallel.sp with tp=1 does nothing (Megatron's rule) and says so; the resumed run below,
    # without it, reproduces these losses exactly.
    full = run(load_config(None, _tiny(tmp, "full", "checkpoint.save_interval=0",
                                       "parallel.sp=true")))
    assert "warning: parallel.sp=true has no effect with parallel.tp=1" in \
        (tmp / "full" / "logs" / "rank_0.log").read_text()
    losses = _losses(tmp / "full")
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 0.3, losses  # it learns
    assert full["valid_loss"] < losses[1] and isinstance(full["sample"], str)

    args = _tiny(tmp, "resumed", "checkpoint.save_interval=5", "checkpoint.load=auto",
                 "logging.tensorboard=true")
    first = run(load_config(None, args), stop_after=7)  # saves at 5 and 7
    assert first["step"] == 7
    ck_root = tmp / "resumed" / "checkpoints"
    # A crash while saving step 8, a corrupted step 7 and a truncated step 9 must not hide step 5.
    (ck_root / "step_000008.tmp").mkdir()
    (ck_root / "step_000008.tmp" / "model_rank0.safetensors").write_bytes(b"partial")
    shutil.copytree(ck_root / "step_000005", ck_root / "step_000009")
    with open(ck_root / "step_000009" / "model_rank0.safetensors", "r+b") as fh:
        fh.truncate(100)
    with open(ck_root / "step_000007" / "optim_rank0.safetensors", "r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"\xff\xff\xff")
    second = run(load_config(None, args))
    assert second["step"] == 10
    assert _losses(tmp / "resumed") == losses  # steps 1-5 from the first run, 6-10 resumed
    # Each step once in metrics.jsonl (6 and 7 of the first run dropped) and in TensorBoard.
    rows = [json.loads(line) for line in (tmp / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [
        *[("train", s) for s in range(1, 6)], ("resumed", 5), *[("train", s) for s in range(6, 11)],
        ("valid", 10)]
    assert rows[5]["checkpoint"] == str(ck_root / "step_000005")
    tb = tensorboard_scalars(tmp / "resumed" / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == list(range(1, 11))
    np.testing.assert_allclose([v for _, v in tb["train/loss"]], [losses[s] for s in range(1, 11)],
                               rtol=1e-6)
    log = (tmp / "resumed" / "logs" / "rank_0.log").read_text()
    for bad, why in (("step_000009", "is truncated"), ("step_000007", "is corrupted")):
        assert f"checkpoint.load=auto: skipping '{ck_root / bad}': checkpoint file" in log
        assert why in log.split(f"skipping '{ck_root / bad}'")[1].splitlines()[0]
    a = load_checkpoint(tmp / "full" / "checkpoints" / "step_000010")
    b = load_checkpoint(ck_root / "step_000010")
    assert sorted(a.model) == sorted(b.model)
    for name in a.model:
        np.testing.assert_array_equal(a.model[name], b.model[name], err_msg=name)
    for name in a.optimizer:
        np.testing.assert_array_equal(a.optimizer[name], b.optimizer[name], err_msg=name)
    assert not (ck_root / "step_000008.tmp").exists()
    # evaluate.py and generate.py read the checkpoint back: same validation loss, same sample.
    from training.evaluate import evaluate
    from training.generate import generate_text, load
    from training.pretrain import SAMPLE

    ev = evaluate(load_config(None, _tiny(tmp, "full", "checkpoint.load=auto")))
    assert abs(ev["loss"] - full["valid_loss"]) <= 1e-6 * full["valid_loss"], (ev, full)
    # training.eval_iters=0: evaluate.py takes the whole validation split (whole micro-batches)
    whole = evaluate(load_config(None, _tiny(tmp, "full", "checkpoint.load=auto",
                                             "training.eval_iters=0")))
    n_valid = len(_valid_split(tmp))
    assert whole["tokens"] == n_valid // 4 * 4 * 32 > 2 * 4 * 32, (whole, n_valid)
    assert abs(whole["loss"] - ev["loss"]) < 0.2 * ev["loss"], (whole, ev)
    model, tok = load(str(tmp / "full"))
    assert generate_text(model, tok, seed=1234, max_new_tokens=48, **SAMPLE) == full["sample"]
    print("SINGLE_OK")


def _valid_split(tmp: Path):
    """The validation samples of the TINY runs' data (built by the reference run)."""
    from training.config import load_config
    from training.data.pipeline import build_data

    return build_data(load_config(None, _tiny(tmp, "full")), rank=0, dp_rank=0,
                      log=lambda line: None).valid


def test_diverging_run_skips_stops_in_one_line_and_keeps_good_checkpoints(tmp_path):
    """optimizer.lr=1e6 in fp32: the gradient norm turns NaN at step 3; steps 3-5 are skipped
    (logged), the run stops after training.max_skipped_steps=3 with one line and status 2, no
    checkpoint is written from a skipped step, keep_last=2 keeps steps 1-2 (finite, verified)
    and load=auto resumes from the newest of them; with both damaged, load=auto refuses in one
    line instead of starting again from step 0."""
    from training.checkpointing import load_checkpoint, resolve_load

    out = tmp_path / "run"
    res = subprocess.run([sys.executable, PRETRAIN, *_tiny(
        tmp_path, "run", "optimizer.lr=1e6", "optimizer.warmup_iters=0", "checkpoint.save_interval=1",
        "checkpoint.keep_last=2", "training.max_skipped_steps=3", "logging.log_interval=1",
        "logging.sample_tokens=0")], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        f"numerical error: steps 3-5 were all skipped (loss or gradient norm not finite; "
        f"training.max_skipped_steps=3); the checkpoints in '{out / 'checkpoints'}' were left as "
        "they were: lower optimizer.lr (or training.loss_scale with fp16), then resume with "
        "checkpoint.load=auto"], res.stderr[-3000:]
    for step, n in ((3, 1), (4, 2), (5, 3)):
        assert f"step {step}: loss " in res.stdout
        assert f"update skipped ({n} in a row, training.max_skipped_steps=3)" in res.stdout
    grads = _losses(out, "grad_norm")
    assert sorted(grads) == [1, 2, 3, 4, 5] and [grads[s] for s in (3, 4, 5)] == [None] * 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    path = resolve_load("auto", out / "checkpoints")
    assert path == out / "checkpoints" / "step_000002"
    ck = load_checkpoint(path)
    ck_bytes = (path / "model_rank0.safetensors").stat().st_size
    assert all(np.isfinite(v).all() for v in [*ck.model.values(), *ck.optimizer.values()])
    assert ck.meta["optimizer"] == {"adam_steps": 2}
    # With every checkpoint damaged, load=auto refuses in one line (no silent start from step 0).
    for step in (1, 2):
        with open(out / "checkpoints" / f"step_00000{step}" / "model_rank0.safetensors", "r+b") as fh:
            fh.truncate(64)
    res = subprocess.run([sys.executable, PRETRAIN, *_tiny(tmp_path, "run", "checkpoint.load=auto")],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        f"checkpoint error: checkpoint.load=auto: none of the 2 checkpoint(s) under "
        f"'{out / 'checkpoints'}' verifies (newest: checkpoint file "
        f"'{out / 'checkpoints' / 'step_000002' / 'model_rank0.safetensors'}' is truncated or "
        f"altered: 64 bytes, expected {ck_bytes}); to train from step 0 deliberately, set "
        f"checkpoint.load=none or move '{out / 'checkpoints'}' away"], res.stderr[-3000:]
    for step in (2, 1):
        assert f"checkpoint.load=auto: skipping '{out / 'checkpoints' / f'step_00000{step}'}'" in res.stdout


def check_sp_checkpoint_reads_without_sp(tmp: str, run: str) -> None:
    """The tp=2 sequence-parallel run's checkpoint joins into a one-process model without
    sequence parallelism (same names and shapes): weights equal to the one-process run's, and
    the same sample as the run printed (fresh process: the execution mode is process-global)."""
    from training.checkpointing import load_checkpoint
    from training.generate import generate_text, load
    from training.pretrain import SAMPLE

    tmp = Path(tmp)
    model, tok = load(str(tmp / run))
    full = load_checkpoint(tmp / "full" / "checkpoints" / "step_000010").model
    weights = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    assert sorted(weights) == sorted(full)
    for name, value in full.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    text = generate_text(model, tok, seed=1234, max_new_tokens=48, **SAMPLE)
    printed = (tmp / run / "logs" / "rank_0.log").read_text()
    assert len(text) > len(SAMPLE["prompt"]) and text in printed, (text, printed[-1500:])
    print("SP_CHECKPOINT_OK")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run (10 steps), shared by the parity tests."""
    tmp = tmp_path_factory.mktemp("pretrain")
    res = run_python(f"from tests.training.test_pretrain import check_single_process; "
                     f"check_single_process({str(tmp)!r})", cwd=tmp)
    return tmp, res


def test_loss_falls_and_resume_is_exact(reference):
    tmp, res = reference
    assert res.returncode == 0 and "SINGLE_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert "step 10/10" in res.stdout and "sample (" in res.stdout


# ------------------------------------------------- real ranks: one 2-rank launch for every run

# A few buckets, some parameters cut. The optimizer is under test, not validation: these runs
# turn it off (training.eval_iters=0; the dp / tp runs check it against one process).
ZERO = ["optimizer.distributed=true", "optimizer.bucket_size=20000", "training.eval_iters=0"]
TWO_RANKS = {  # run: overrides; dp=2 validates 1 micro-batch per rank: the one process's 2
    "tp2": ["parallel.tp=2"],
    "dp2": ["parallel.tp=1", "training.eval_iters=1"],
    "tp2_sp": ["parallel.tp=2", "parallel.sp=true"],  # sequence parallel
}


@pytest.fixture(scope="module")
def two_rank_runs(reference):
    """The TWO_RANKS runs, then dp=2 with the distributed optimizer (checkpoints at steps 5 and
    10) and its resume from step 5, in ONE msrun launch (``tests/training/runs_worker.py``)."""
    tmp, res = reference
    assert res.returncode == 0, res.stderr[-3000:]
    step5 = tmp / "zero_dp2" / "checkpoints" / "step_000005"
    runs = [_tiny(tmp, run, *extra, "checkpoint.save_interval=0")
            for run, extra in TWO_RANKS.items()]
    runs += [_tiny(tmp, "zero_dp2", *ZERO, "checkpoint.save_interval=5", "logging.sample_tokens=0"),
             _tiny(tmp, "zero_dp2_resumed", *ZERO, f"checkpoint.load={step5}",
                   "logging.sample_tokens=0")]
    launch_runs(tmp, "pretrain", runs, workers=2, timeout=900)
    return tmp


@pytest.mark.multirank
@pytest.mark.parametrize("run", list(TWO_RANKS))
def test_two_ranks_match_one_process(two_rank_runs, run):
    tmp = two_rank_runs
    run_dir, sp = tmp / run, "parallel.sp=true" in TWO_RANKS[run]
    one, two = _losses(tmp / "full"), _losses(run_dir)
    assert sorted(two) == sorted(one)
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    # The global gradient norm (tp-split squares summed over tp, replicated ones once) agrees too.
    g1, g2 = _losses(tmp / "full", "grad_norm"), _losses(run_dir, "grad_norm")
    rel = 1e-5 if sp else 1e-4
    for step in g1:
        assert abs(g2[step] - g1[step]) <= rel * g1[step], (step, g1[step], g2[step])
    v1, v2 = _valid_loss(tmp / "full"), _valid_loss(run_dir)
    assert abs(v2 - v1) <= 1e-5 * v1, (v1, v2)
    run_log = (run_dir / "logs" / "rank_0.log").read_text()
    assert "sample (" in run_log, run_log[-2000:]  # with sp: sampled by a twin model without it
    assert ("sequence parallel" in run_log) == sp, run_log[:2000]
    if sp:
        res = run_python(f"from tests.training.test_pretrain import check_sp_checkpoint_reads_"
                         f"without_sp as c; c({str(tmp)!r}, {run!r})", cwd=tmp)
        assert res.returncode == 0 and "SP_CHECKPOINT_OK" in res.stdout, \
            res.stdout[-3000:] + res.stderr[-3000:]


def _launch(tmp: Path, run: str, *extra, workers: int = 2) -> str:
    cmd = msrun_command(PRETRAIN, _tiny(tmp, run, *extra), workers=workers)
    out = run_msrun(cmd, cwd=tmp, timeout=300)
    logs = worker_logs(tmp / "logs")
    assert out.returncode == 0, out.stdout[-2000:] + logs[-4000:]
    return logs


def _matches_full(tmp: Path, run: str) -> None:
    """Per-step loss and global gradient norm of ``run`` equal the one-process run's (1e-5)."""
    for key in ("loss", "grad_norm"):
        one, other = _losses(tmp / "full", key), _losses(tmp / run, key)
        assert sorted(other) == sorted(one), (key, sorted(other))
        for step in one:
            assert abs(other[step] - one[step]) <= 1e-5 * abs(one[step]), (key, step, one[step],
                                                                           other[step])


@pytest.mark.multirank
def test_distributed_optimizer_dp2_matches_one_process_and_resumes_exactly(two_rank_runs):
    from training.checkpointing import load_checkpoint

    tmp = two_rank_runs
    _matches_full(tmp, "zero_dp2")
    step10 = tmp / "zero_dp2" / "checkpoints" / "step_000010"
    # each rank saved only its pieces of the moments (flat ranges); together they are the whole
    # moments, close to the one-process run's (same math, other summation order)
    tensors = json.loads((step10 / "meta.json").read_text())["tensors"]
    sizes = [sum(sh["flat"][1] - sh["flat"][0] for n, t in tensors.items() if n.startswith("adam_m.")
                 for sh in t["shards"] if sh["file"] == f"optim_rank{r}.safetensors") for r in (0, 1)]
    full = load_checkpoint(tmp / "full" / "checkpoints" / "step_000010")
    total = sum(v.size for k, v in full.optimizer.items() if k.startswith("adam_m."))
    assert sum(sizes) == total and abs(sizes[0] - sizes[1]) <= 4, (sizes, total)
    saved = load_checkpoint(step10)  # what any layout's resume reads
    assert sorted(saved.optimizer) == sorted(full.optimizer)
    for name, value in saved.optimizer.items():
        np.testing.assert_allclose(value, full.optimizer[name], rtol=1e-3, atol=1e-7, err_msg=name)
    for name, value in saved.model.items():
        np.testing.assert_allclose(value, full.model[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # resuming step 5 on the same layout reproduces steps 6-10 and the final weights bit for bit
    first, again = _losses(tmp / "zero_dp2"), _losses(tmp / "zero_dp2_resumed")
    assert sorted(again) == [6, 7, 8, 9, 10], sorted(again)
    assert _valid_losses(tmp / "zero_dp2_resumed") == []  # training.eval_iters=0
    assert "training.eval_iters=0: validation is off" in \
        (tmp / "zero_dp2_resumed" / "logs" / "rank_0.log").read_text()
    assert all(again[s] == first[s] for s in again), (first, again)
    resumed = tmp / "zero_dp2_resumed" / "checkpoints" / "step_000010"
    again = load_checkpoint(resumed)
    for kind in ("model", "optimizer"):
        for name, value in getattr(saved, kind).items():
            np.testing.assert_array_equal(getattr(again, kind)[name], value, err_msg=name)


def check_zero_cross_load(tmp: str) -> None:
    """One process: the distributed optimizer resumes the non-distributed checkpoint at step 5 of
    the reference, and a plain run resumes its sharded checkpoint at step 8; both continue the
    reference's losses (1e-6; the norm is summed in another order)."""
    from training.config import load_config
    from training.pretrain import run

    tmp = Path(tmp)
    step5 = tmp / "resumed" / "checkpoints" / "step_000005"
    run(load_config(None, _tiny(tmp, "zero_from_plain", *ZERO, f"checkpoint.load={step5}",
                                "checkpoint.save_interval=8", "logging.sample_tokens=0")))
    step8 = tmp / "zero_from_plain" / "checkpoints" / "step_000008"
    run(load_config(None, _tiny(tmp, "plain_from_zero", f"checkpoint.load={step8}",
                                "logging.sample_tokens=0")))
    print("CROSS_OK")


def test_distributed_optimizer_checkpoints_load_both_ways(reference):
    tmp, res = reference
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_python(f"from tests.training.test_pretrain import check_zero_cross_load; "
                     f"check_zero_cross_load({str(tmp)!r})", cwd=tmp)
    assert res.returncode == 0 and "CROSS_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    one = _losses(tmp / "full")
    for run, steps in (("zero_from_plain", range(6, 11)), ("plain_from_zero", range(9, 11))):
        got = _losses(tmp / run)
        assert sorted(got) == list(steps), (run, sorted(got))
        for step in steps:
            assert abs(got[step] - one[step]) <= 1e-6 * one[step], (run, step, one[step], got[step])


@pytest.mark.multirank
def test_distributed_optimizer_dp2_tp2_matches_one_process(reference):
    tmp, res = reference
    assert res.returncode == 0, res.stderr[-3000:]
    logs = _launch(tmp, "zero_dp2_tp2", *ZERO, "parallel.tp=2", "checkpoint.save_interval=0",
                   "logging.sample_tokens=0", workers=4)
    assert "tp 2 x pp 1 x dp 2" in logs
    _matches_full(tmp, "zero_dp2_tp2")
