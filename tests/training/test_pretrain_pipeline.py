"""training/pretrain.py with pipeline parallelism, on real ranks (msrun), against one process.

A tiny Llama with 5 layers and TIED embeddings (so the embedding-group gradient sum and the
global norm that counts the tied weight once are exercised), 8 steps of 2 micro-batches:

- pp=2 (1F1B, layers split 3 + 2), pp=2 x vpp=2 (interleaved, 2 + 1 + 1 + 1) and pp=2 x tp=2
  with sequence parallelism (4 ranks, 2 + 3; stages exchange ``[b, s/tp, h]``, the final
  sample comes from a twin without sp) give the single-process per-step loss (1e-5 relative)
  and global gradient norm (1e-4; 1e-5 with sp), and the same final validation loss;
- in the pp=2 checkpoint each stage's layers are written by its rank (the tied embedding
  once) and read back as the whole model, equal to the one-process weights; resuming it at step 4 reproduces steps 5-8;
  evaluate.py under msrun with pp=2 reads it back; generate.py reads the checkpoint into one
  process and samples the same text the pipelined run printed;
- pp=2 with fp16 compute (loss scale through the schedule) tracks the fp32 losses (1e-2) and
  unscaled gradient norms (1e-3 at the first step, 5e-2 after: rounding scatters them).

The training runs of each rank count share one msrun launch (``tests/training/runs_worker.py``).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tests.fresh_process import run_python
from tests.msrun_util import msrun_command, run_msrun, worker_logs
from tests.multirank import REPO_ROOT
from tests.training.runs_worker import launch_by_rank_count

pytestmark = pytest.mark.multirank

EVALUATE = str(REPO_ROOT / "training" / "evaluate.py")
TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=5", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=32",
        "model.max_position_embeddings=32", "model.tie_word_embeddings=true",
        "data.corpus_max_bytes=200000", "training.micro_batch_size=4",
        "training.global_batch_size=8", "training.train_iters=8", "training.eval_interval=0",
        "training.eval_iters=2", "optimizer.lr=1e-2", "optimizer.min_lr=1e-3",
        "optimizer.warmup_iters=2", "logging.log_interval=4", "logging.tensorboard=false",
        "checkpoint.save_interval=4", "logging.sample_tokens=8"]


def _args(tmp: Path, run: str, *extra) -> list[str]:
    return [*TINY, f"data.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp / run}", *extra]


def _metrics(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r["kind"] == kind}


def _close(got: dict, want: dict, rel: float, what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (what, step, want[step], got[step])


def run_reference(tmp: str) -> None:
    """The one-process run (in a fresh interpreter: the execution mode is process-global)."""
    from training.config import load_config
    from training.pretrain import run

    tmp = Path(tmp)
    run(load_config(None, _args(tmp, "one")))
    print("REFERENCE_OK")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline_pretrain")
    res = run_python(f"from tests.training.test_pretrain_pipeline import run_reference; "
                     f"run_reference({str(tmp)!r})", cwd=tmp)
    assert res.returncode == 0 and "REFERENCE_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp


def _launch(tmp: Path, script: str, args: list[str], workers: int, timeout: float = 300):
    out = run_msrun(msrun_command(script, args, workers=workers), cwd=tmp, timeout=timeout)
    logs = worker_logs(tmp / "logs")
    assert out.returncode == 0, out.stdout[-2000:] + logs[-6000:]
    return logs


def _matches_reference(tmp: Path, run: str, grad_rel: float = 1e-4) -> None:
    one, other = tmp / "one", tmp / run
    _close(_metrics(other, "train", "loss"), _metrics(one, "train", "loss"), 1e-5, "loss")
    _close(_metrics(other, "train", "grad_norm"), _metrics(one, "train", "grad_norm"), grad_rel,
           "grad_norm")
    _close(_metrics(other, "valid", "valid_loss"), _metrics(one, "valid", "valid_loss"), 1e-5,
           "valid_loss")


PP2 = ["parallel.pp=2", "parallel.layers_per_stage=[3,2]"]
RUNS = {  # run: (ranks, overrides)
    "pp2": (2, PP2),  # checkpoints at steps 4 and 8
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", "parallel.layers_per_stage=[2,1,1,1]"]),
    "pp2_fp16": (2, [*PP2, "training.dtype=fp16"]),
    # pp=2 x tp=2 runs with sequence parallelism: the stage exchange of [b, s/tp, h] on top of
    # the tp path (pp=2 x tp=2 GPT stages without sp: tests/models/test_gpt_pipeline.py).
    "pp2_tp2_sp": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true",
                       "parallel.layers_per_stage=[2,3]"]),
    "pp2_dp2_zero": (4, [*PP2, "optimizer.distributed=true", "optimizer.bucket_size=20000",
                         "checkpoint.save_interval=0", "logging.sample_tokens=0",
                         "training.eval_iters=0"]),
}


@pytest.fixture(scope="module")
def launched(reference):
    """Every ``RUNS`` run and the pp=2 run's resume from step 4, one msrun launch per rank count
    (``tests/training/runs_worker.py``)."""
    tmp = reference
    step4 = tmp / "pp2" / "checkpoints" / "step_000004"
    runs = {**RUNS, "pp2_resumed": (2, [*PP2, f"checkpoint.load={step4}"])}  # after pp2
    launch_by_rank_count(tmp, "pretrain", {run: (ranks, _args(tmp, run, *extra))
                                           for run, (ranks, extra) in runs.items()})
    return tmp


def _log(tmp: Path, run: str) -> str:
    return (tmp / run / "logs" / "rank_0.log").read_text()


def test_pp2_matches_one_process_and_checkpoints_per_stage(launched):
    from training.checkpointing import load_checkpoint

    tmp = launched
    log = _log(tmp, "pp2")
    assert "pp 2" in log and "sample (" in log, log[-2000:]
    _matches_reference(tmp, "pp2")
    full = load_checkpoint(tmp / "one" / "checkpoints" / "step_000008").model
    ck = tmp / "pp2" / "checkpoints" / "step_000008"
    files = {n: {sh["file"] for sh in t["shards"]}
             for n, t in json.loads((ck / "meta.json").read_text())["tensors"].items()}
    assert files["decoder.layers.2.self_attention.linear_qkv.weight"] == {"model_rank0.safetensors"}
    assert files["decoder.layers.3.self_attention.linear_qkv.weight"] == {"model_rank1.safetensors"}
    assert files["embedding.weight"] == {"model_rank0.safetensors"}  # the tied copy: written once
    saved = load_checkpoint(ck).model  # the stages' tensors under their global names
    assert set(saved) == set(full)
    for name, value in saved.items():
        np.testing.assert_allclose(value, full[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_pp2_resume_eval_and_generate(launched):
    tmp = launched
    first, resumed = _metrics(tmp / "pp2", "train", "loss"), _metrics(tmp / "pp2_resumed", "train", "loss")
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == pytest.approx(first[step], rel=1e-6), (step, first, resumed)
    step8 = tmp / "pp2" / "checkpoints" / "step_000008"
    logs = _launch(tmp, EVALUATE, _args(tmp, "pp2", "parallel.pp=2",
                                        "parallel.layers_per_stage=[3,2]", f"checkpoint.load={step8}"),
                   workers=2)
    want = _metrics(tmp / "pp2", "valid", "valid_loss")[8]
    line = next(x for x in logs.splitlines() if "valid loss" in x)
    assert abs(float(line.split("valid loss")[1].split("|")[0]) - want) <= 1e-4 * want, (line, want)
    # generate.py joins the stages into one process: the sample the pipelined run printed.
    res = run_python("from training.generate import generate_text, load; "
                     "from training.pretrain import SAMPLE; "
                     f"m, t = load({str(step8)!r}); print('SAMPLE<<' + generate_text(m, t, seed=1234, "
                     "max_new_tokens=8, **SAMPLE) + '>>')", cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    merged = res.stdout.split("SAMPLE<<", 1)[1].rsplit(">>", 1)[0]
    printed = (tmp / "pp2" / "logs" / "rank_0.log").read_text()
    assert len(merged) > len("def ") and merged in printed, (merged, printed[-1500:])


@pytest.mark.parametrize("run", ["pp2_vpp2", "pp2_tp2_sp"])
def test_pipeline_layouts_match_one_process(launched, run):
    tmp = launched
    sp = "parallel.sp=true" in RUNS[run][1]
    _matches_reference(tmp, run, grad_rel=1e-5 if sp else 1e-4)
    log = _log(tmp, run)
    assert ("sequence parallel" in log) == sp and "sample (" in log, log[-2000:]


def test_pp2_dp2_distributed_optimizer_matches_one_process(launched):
    """pp=2 x dp=2 (4 ranks) with the distributed optimizer: each stage shards its moments over
    its dp pair; the tied embedding's two copies get the same update on both stages. Per-step
    loss and gradient norm equal the one-process run's (1e-5). (Validation is off,
    ``training.eval_iters=0``: with dp=2 it would read other samples.)"""
    tmp = launched
    for key in ("loss", "grad_norm"):
        _close(_metrics(tmp / "pp2_dp2_zero", "train", key), _metrics(tmp / "one", "train", key),
               1e-5, key)


def test_pp2_fp16_tracks_the_fp32_run(launched):
    """fp16 matmuls with the static loss scale applied by the schedule (unscaled before the
    update), against the fp32 one-process run: the first step's unscaled gradient norm (same
    weights, same batch) within 1e-3, every step's loss within 1e-2 and gradient norm within 5e-2."""
    tmp = launched
    assert "compute fp16, loss scale 1024" in _log(tmp, "pp2_fp16")
    half, full = (_metrics(tmp / run, "train", "grad_norm") for run in ("pp2_fp16", "one"))
    _close({1: half[1]}, {1: full[1]}, 1e-3, "fp16 grad_norm of step 1 (unscaled)")
    _close(_metrics(tmp / "pp2_fp16", "train", "loss"), _metrics(tmp / "one", "train", "loss"), 1e-2,
           "fp16 loss")
    # Later steps start from weights the fp16 run has already moved differently, and every
    # ulp-level difference in the fp32 master weights re-draws the fp16 rounding of the next
    # step, so their norms scatter by rounding alone. Measured on this config at step 3 (the
    # norm's peak, 2.79): pp=2 composed ops +0.2 %, pp=2 CPU kernels -2.2 %, one process
    # composed -2.3 %, one process kernels -2.6 % (the pp=2 and one-process fp16 runs, same ops,
    # differ by 2.5 %); with training.seed=2 composed -0.4 %, kernels -0.4 %; with seed 3 the
    # composed run's norm spiked to 7.9 at step 5 (fp32: 1.45). Losses moved by at most 7e-4 on
    # this config, the first step's norm by at most 4e-5. The kernels are not the cause: in fp16
    # only the norms take them (the other kernels see fp16 inputs and use the composed ops), and
    # they agree with the composed norm to 3 ulp forward, 2e-7 of the largest gradient backward.
    _close(half, full, 5e-2, "fp16 grad_norm (unscaled)")
