"""Bad input through the real entry points: exit status 2 and ONE line on stderr,
``<kind> error: <message>`` naming the key or file, no traceback.

Path faults (data.corpus, data.tokenizer, checkpoint.load, logging.output_dir, model.hf_path;
evaluate.py with no checkpoint) are found before any work (the output directory is not even created); a corpus
too small for one global batch when the data is built; a checkpoint that does not fit and a
run whose loss turns NaN (``FloatingPointError``, after ``training.max_skipped_steps`` skipped
steps) when they happen.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multirank import REPO_ROOT

CONFIG = str(REPO_ROOT / "configs" / "tiny_llama_demo.yaml")
TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=32",
        "model.max_position_embeddings=32", "training.micro_batch_size=4",
        "training.global_batch_size=8", "training.train_iters=3", "training.mode=pynative",
        "training.eval_interval=0", "training.eval_iters=2", "data.valid_fraction=0.2",
        "logging.tensorboard=false", "logging.sample_tokens=0"]


def entry(script: str, args: list[str], cwd: Path,
          timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, str(REPO_ROOT / "training" / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def assert_user_error(res: subprocess.CompletedProcess, kind: str, *names: str) -> str:
    """Exit 2, exactly one stderr line ``<kind> error: ...`` containing every one of ``names``."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"{kind} error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


def _corpus(path: Path, lines: int) -> Path:
    rng = random.Random(0)
    words = ["def", "class", "return", "self", "value", "import", "for", "in", "if", "print"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines)))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch dir with a small corpus (enough for a few global batches) and a shared cache."""
    tmp = tmp_path_factory.mktemp("entry_errors")
    _corpus(tmp / "corpus.txt", 400)
    (tmp / "a_file").write_text("not a directory")
    return tmp


def _args(work: Path, *extra: str) -> list[str]:
    return ["--config", CONFIG, *TINY, f"data.corpus={work / 'corpus.txt'}",
            f"data.cache_dir={work / 'cache'}", f"logging.output_dir={work / 'out'}", *extra]


@pytest.mark.parametrize("override, kind, names", [
    ("data.corpus={w}/no_such_dir", "data", ["data.corpus=", "no_such_dir"]),
    ("data.tokenizer={w}/missing_tok.json", "config", ["data.tokenizer", "missing_tok.json"]),
    ("checkpoint.load={w}/no_such_checkpoint", "checkpoint",
     ["checkpoint.load=", "no_such_checkpoint", "'none', 'auto'"]),
    ("checkpoint.load=latest", "checkpoint", ["checkpoint.load='latest'", "'none', 'auto'"]),
    ("logging.output_dir={w}/a_file/run", "config", ["logging.output_dir=", "a_file"]),
    ("model.hf_path={w}/no_hf_dir", "config", ["model.hf_path", "no_hf_dir", "config.json"]),
])
def test_bad_path_fails_in_one_line_before_work(work, override, kind, names):
    res = entry("pretrain.py", _args(work, override.format(w=work)), cwd=work, timeout=60)
    assert_user_error(res, kind, *names)
    assert not (work / "out").exists()  # stopped before the run directory was made


def test_evaluate_without_a_checkpoint_fails_before_building_the_model(work):
    res = entry("evaluate.py", _args(work, f"logging.output_dir={work / 'never_trained'}"),
                cwd=work, timeout=60)
    assert_user_error(res, "checkpoint", "no valid checkpoint", "never_trained")
    assert not (work / "never_trained").exists()


def test_corpus_too_small_for_one_global_batch(work):
    small = _corpus(work / "small.txt", 6)
    res = entry("pretrain.py", _args(work, f"data.corpus={small}"), cwd=work)
    assert_user_error(res, "data", f"data.corpus='{small}'", "training.global_batch_size=8")


def test_checkpoint_error_during_resume(work):
    ck = work / "old_format" / "step_000003"  # a checkpoint of the earlier per-rank format
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"format": 1, "step": 3, "world_size": 2, "meta": {},
                                              "files": {}}))
    res = entry("pretrain.py", _args(work, f"checkpoint.load={ck}",
                                     f"logging.output_dir={work / 'resume'}"), cwd=work)
    assert_user_error(res, "checkpoint", str(ck / "meta.json"), "format 1", "format 2")


def test_nan_loss_stops_with_one_line(work):
    # AdamW moves every weight by ~lr: the gradient norm overflows to NaN at step 2 (one layer,
    # one micro-batch per step keep the run short); steps 2 and 3 are skipped, then it stops.
    res = entry("pretrain.py", _args(work, "optimizer.lr=1e30", "optimizer.warmup_iters=0",
                                     "model.num_layers=1", "training.global_batch_size=4",
                                     "training.train_iters=6", "training.max_skipped_steps=2",
                                     "checkpoint.load=none", f"logging.output_dir={work / 'nan'}"),
                cwd=work)
    assert_user_error(res, "numerical", "steps 2-3 were all skipped", "not finite",
                      "training.max_skipped_steps=2", "optimizer.lr")
