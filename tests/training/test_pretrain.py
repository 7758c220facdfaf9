"""training/pretrain.py end to end on a tiny Llama and a slice of the bundled corpus.

- bad configs stop with one line naming the key, exit status 2, before any work;
- one process: the loss falls; 10 steps == 5 steps + stop + resume 5 (same losses, same
  weights), and a half-written / corrupted newer checkpoint is skipped by ``load=auto``;
  evaluate.py / generate.py read the checkpoint back (same validation loss, same sample);
- real ranks (msrun): dp=2 and tp=2 give the single-process per-step losses (1e-5 relative).
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
    full = run(load_config(None, _tiny(tmp, "full", "checkpoint.save_interval=0")))
    losses = _losses(tmp / "full")
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 0.3, losses  # it learns
    assert full["valid_loss"] < losses[1] and isinstance(full["sample"], str)

    args = _tiny(tmp, "resumed", "checkpoint.save_interval=0", "checkpoint.load=auto")
    first = run(load_config(None, args), stop_after=5)
    assert first["step"] == 5
    ck_root = tmp / "resumed" / "checkpoints"
    # A crash while saving step 7 and a corrupted step 9 must not hide step 5.
    (ck_root / "step_000007.tmp").mkdir()
    (ck_root / "step_000007.tmp" / "model_rank0.safetensors").write_bytes(b"partial")
    shutil.copytree(ck_root / "step_000005", ck_root / "step_000009")
    with open(ck_root / "step_000009" / "model_rank0.safetensors", "r+b") as fh:
        fh.truncate(100)
    second = run(load_config(None, args))
    assert second["step"] == 10
    assert _losses(tmp / "resumed") == losses  # steps 1-5 from the first run, 6-10 resumed
    a = load_checkpoint(tmp / "full" / "checkpoints" / "step_000010")
    b = load_checkpoint(ck_root / "step_000010")
    assert sorted(a.model) == sorted(b.model)
    for name in a.model:
        np.testing.assert_array_equal(a.model[name], b.model[name], err_msg=name)
    for name in a.optimizer:
        np.testing.assert_array_equal(a.optimizer[name], b.optimizer[name], err_msg=name)
    assert not (ck_root / "step_000007.tmp").exists()
    # evaluate.py and generate.py read the checkpoint back: same validation loss, same sample.
    from training.evaluate import evaluate
    from training.generate import generate_text, load
    from training.pretrain import SAMPLE

    ev = evaluate(load_config(None, _tiny(tmp, "full", "checkpoint.load=auto")))
    assert abs(ev["loss"] - full["valid_loss"]) <= 1e-6 * full["valid_loss"], (ev, full)
    model, tok = load(str(tmp / "full"))
    assert generate_text(model, tok, seed=1234, max_new_tokens=48, **SAMPLE) == full["sample"]
    print("SINGLE_OK")


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


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.tp=1"])  # tp=2 / dp=2
def test_two_ranks_match_one_process(reference, layout):
    tmp, res = reference
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp / layout.replace("=", "")
    cmd = msrun_command(PRETRAIN, _tiny(tmp, run_dir.name, layout, "checkpoint.save_interval=0"),
                        workers=2)
    out = run_msrun(cmd, cwd=tmp, timeout=200)
    logs = worker_logs(tmp / "logs")
    assert out.returncode == 0, out.stdout[-2000:] + logs[-4000:]
    one, two = _losses(tmp / "full"), _losses(run_dir)
    assert sorted(two) == sorted(one)
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    # The global gradient norm (tp-split squares summed over tp, replicated ones once) agrees too.
    g1, g2 = _losses(tmp / "full", "grad_norm"), _losses(run_dir, "grad_norm")
    for step in g1:
        assert abs(g2[step] - g1[step]) <= 1e-4 * g1[step], (step, g1[step], g2[step])
    assert "sample (" in logs
