"""training/pretrain.py with context parallelism, on real ranks (msrun), against one process.

A tiny Llama (2 layers, 4 query / 2 key-value heads, sequences of 32 tokens), 3 steps of a
global batch of 4 sequences. Every context-parallel run gives the one-process loss and global
gradient norm per step and, with dp = 1, the final validation loss (1e-5 relative):

- 2 ranks, one launch: cp=2 with each scheme of ``CP_SCHEMES`` (``parallel.cp_comm``); the a2a
  run also samples at the end through a twin without cp, and its checkpoint (cp ranks are
  replicas: written once) is read by one process: ``evaluate.py`` gives the run's validation
  loss, ``generate.py`` the text the run printed;
- 4 ranks, one launch: cp=2 x tp=2 with sequence parallelism (a2a: each tp rank's 2 heads split
  over cp, its 1 kv head replicated), and cp=2 x dp=2 (ring) with the distributed optimizer
  sharded over the 4 dp x cp ranks.

Runs of one launch share it (``tests/training/runs_worker.py``): a launch costs 10-35 s.
"""
import json
from pathlib import Path

import pytest

from tests.fresh_process import run_python
from tests.training.runs_worker import launch_runs

pytestmark = pytest.mark.multirank

CP_SCHEMES = ("a2a", "ring")  # parallel.cp_comm values, each trained on 2 ranks
TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=32",
        "model.max_position_embeddings=32", "data.corpus_max_bytes=200000",
        "training.micro_batch_size=2", "training.global_batch_size=4", "training.train_iters=3",
        "training.eval_interval=0", "training.eval_iters=1", "optimizer.lr=1e-2",
        "optimizer.warmup_iters=1", "logging.log_interval=1", "logging.tensorboard=false",
        "checkpoint.save_interval=0", "logging.sample_tokens=0"]
SAMPLED = "logging.sample_tokens=8"


def _args(tmp: Path, run: str, *extra) -> list[str]:
    return [*TINY, f"data.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp / run}", *extra]


def _metrics(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r["kind"] == kind}


def _matches_reference(tmp: Path, run: str, valid: bool = True) -> None:
    """Loss and gradient norm per step (and the final validation loss) equal the one-process
    run's. ``valid=False`` for dp > 1: each dp rank then validates its own micro-batches."""
    checks = (("train", "loss"), ("train", "grad_norm")) + ((("valid", "valid_loss"),) if valid else ())
    for kind, key in checks:
        want, got = _metrics(tmp / "one", kind, key), _metrics(tmp / run, kind, key)
        assert sorted(got) == sorted(want) and want, (run, kind, key, got, want)
        for step in want:
            assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), \
                (run, kind, key, step, want[step], got[step])


def _launch(tmp: Path, runs: list[list[str]], workers: int) -> str:
    return launch_runs(tmp, "pretrain", runs, workers)


def run_reference(tmp: str) -> None:
    """The one-process run (in a fresh interpreter: the execution mode is process-global)."""
    from training.config import load_config
    from training.pretrain import run

    run(load_config(None, _args(Path(tmp), "one", SAMPLED)))
    print("REFERENCE_OK")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp_pretrain")
    res = run_python(f"from tests.training.test_pretrain_cp import run_reference; "
                     f"run_reference({str(tmp)!r})", cwd=tmp)
    assert res.returncode == 0 and "REFERENCE_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp


def check_checkpoint_in_one_process(tmp: str, run: str) -> None:
    """The cp run's checkpoint read by one process: evaluate.py's validation loss is the run's,
    generate.py samples the text the run printed (fresh process)."""
    from training.config import load_config
    from training.evaluate import evaluate
    from training.generate import generate_text, load
    from training.pretrain import SAMPLE

    tmp = Path(tmp)
    ev = evaluate(load_config(None, _args(tmp, run, "checkpoint.load=auto")))
    want = _metrics(tmp / run, "valid", "valid_loss")[3]
    assert abs(ev["loss"] - want) <= 1e-5 * want, (ev, want)
    model, tok = load(str(tmp / run))
    text = generate_text(model, tok, seed=1234, max_new_tokens=8, **SAMPLE)
    printed = (tmp / run / "logs" / "rank_0.log").read_text()
    assert len(text) > len(SAMPLE["prompt"]) and text in printed, (text, printed[-1500:])
    print("CP_CHECKPOINT_OK")


def test_cp2_each_scheme_matches_one_process(reference):
    tmp = reference
    runs = [_args(tmp, f"cp2_{scheme}", "parallel.cp=2", f"parallel.cp_comm={scheme}",
                  *([SAMPLED] if i == 0 else [])) for i, scheme in enumerate(CP_SCHEMES)]
    logs = _launch(tmp, runs, workers=2)
    for scheme in CP_SCHEMES:
        _matches_reference(tmp, f"cp2_{scheme}")
        log = (tmp / f"cp2_{scheme}" / "logs" / "rank_0.log").read_text()
        assert f"x cp 2 ({scheme}) x dp 1" in log, log[:1500]
    assert "sample (" in logs
    # cp ranks hold replicas of the weights: one model file, written by cp rank 0
    ckpt = tmp / f"cp2_{CP_SCHEMES[0]}" / "checkpoints" / "step_000003"
    assert sorted(p.name for p in ckpt.glob("model_rank*.safetensors")) == ["model_rank0.safetensors"]
    res = run_python(f"from tests.training.test_pretrain_cp import check_checkpoint_in_one_process"
                     f" as c; c({str(tmp)!r}, 'cp2_{CP_SCHEMES[0]}')", cwd=tmp)
    assert res.returncode == 0 and "CP_CHECKPOINT_OK" in res.stdout, \
        res.stdout[-3000:] + res.stderr[-3000:]


def test_cp2_with_tp2_and_with_dp2_match_one_process(reference):
    tmp = reference
    runs = [_args(tmp, "cp2_tp2_sp", "parallel.cp=2", "parallel.tp=2", "parallel.sp=true"),
            _args(tmp, "cp2_dp2_zero", "parallel.cp=2", "parallel.cp_comm=ring",
                  "optimizer.distributed=true")]
    _launch(tmp, runs, workers=4)
    _matches_reference(tmp, "cp2_tp2_sp")
    _matches_reference(tmp, "cp2_dp2_zero", valid=False)
    log = (tmp / "cp2_dp2_zero" / "logs" / "rank_0.log").read_text()
    assert "x cp 2 (ring) x dp 2" in log, log[:1500]
    assert "x cp 2 (a2a) x dp 1, sequence parallel" in \
        (tmp / "cp2_tp2_sp" / "logs" / "rank_0.log").read_text()
