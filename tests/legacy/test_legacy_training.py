"""Training from a legacy family's Hugging Face directory whose config.json names its vocabulary
otherwise (ChatGLM's ``padded_vocab_size``, no ``vocab_size`` key): ``training/pretrain.py``
with ``model.hf_path`` sizes its checks, its BPE and its data checks by the family's
``vocab_size(hf)`` (``training.model_bridge.model_vocab``), starts from the directory's weights
(lr 0: the step-1 checkpoint holds exactly them) and a tokenizer larger than that vocabulary is
refused naming ``model.hf_path``; ``training/generate.py`` reads the run's checkpoint back with
the directory's vocabulary. One fresh process (the execution mode is process-global)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.fresh_process import assert_check_passes
from tests.multirank import REPO_ROOT

VOCAB = 320  # >= the 258 tokens a byte-level BPE needs


def _chatglm_dir(out: Path) -> Path:
    from models.safetensors_io import write_checkpoint
    from tests.legacy import remote_checkpoints as rc
    from tests.legacy.remote_ref import rand

    rng = np.random.default_rng(3)
    t, config = rc.chatglm(rng, layernorm=False, bias=False, rope_ratio=1.0)
    t["transformer.embedding.word_embeddings.weight"] = rand(rng, VOCAB, rc.GLM_HIDDEN, scale=0.5)
    t["transformer.output_layer.weight"] = rand(rng, VOCAB, rc.GLM_HIDDEN)
    config["padded_vocab_size"] = VOCAB
    assert "vocab_size" not in config
    write_checkpoint(out, t)
    (out / "config.json").write_text(json.dumps(config))
    return out


def check_pretrain_from_chatglm_dir(tmp: str) -> None:
    import models
    from training.checkpointing import load_checkpoint
    from training.config import load_config
    from training.config_validate import ConfigError
    from training.generate import resolve
    from training.pretrain import check_vocab, parse_args, run

    tmp = Path(tmp)
    hf = _chatglm_dir(tmp / "glm")
    args = [f"model.hf_path={hf}", "model.seq_length=16", "model.max_position_embeddings=16",
            f"data.corpus={REPO_ROOT / 'configs' / 'data' / 'tiny_chat.jsonl'}",
            f"data.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp / 'run'}",
            "training.micro_batch_size=2", "training.global_batch_size=2",
            "training.train_iters=1", "training.mode=pynative", "training.eval_interval=0",
            "data.valid_fraction=0", "optimizer.lr=0", "optimizer.min_lr=0",
            "optimizer.warmup_iters=0", "logging.tensorboard=false", "logging.sample_tokens=0",
            "checkpoint.save_interval=0", "model.vocab_size=2048"]  # the YAML's is not the model's
    cfg = parse_args(args)  # check_model: the directory's vocabulary, not a missing vocab_size
    try:
        check_vocab(cfg, VOCAB + 1)
    except ConfigError as exc:
        assert f"model.hf_path's vocabulary={VOCAB}" in str(exc), exc
    else:
        raise AssertionError("a tokenizer larger than the directory's vocabulary was accepted")
    run(load_config(None, args))
    saved = load_checkpoint(tmp / "run" / "checkpoints" / "step_000001").model
    start = {n: p.asnumpy() for n, p in models.from_pretrained(hf).parameters_and_names()}
    assert sorted(saved) == sorted(start)
    for name in saved:
        np.testing.assert_array_equal(saved[name], start[name], err_msg=name)
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 1 and 0 < losses[0] < 2 * np.log(VOCAB), losses
    tok = json.loads(next((tmp / "cache").rglob("tokenizer.json")).read_text())
    assert len(tok["model"]["vocab"]) <= VOCAB  # the BPE the run trained fits the model
    assert resolve(str(tmp / "run")).vocab_size == VOCAB  # generate.py reads the run back
    print("CHATGLM_PRETRAIN_OK")


def test_pretrain_starts_from_a_chatglm_directory(tmp_path):
    assert_check_passes("tests.legacy.test_legacy_training", "check_pretrain_from_chatglm_dir",
                        str(tmp_path), marker="CHATGLM_PRETRAIN_OK", timeout=240)
