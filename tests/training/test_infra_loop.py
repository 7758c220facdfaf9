"""All infrastructure pieces wired into a toy loop, the way training/pretrain.py will use them.

The "model" is a numpy bigram table trained with SGD + momentum, so the test needs no MindSpore;
the point is the plumbing: config -> data -> sampler -> LR schedule -> logger -> checkpoint ->
crash -> ``checkpoint.load=auto`` -> the resumed run reproduces the uninterrupted one exactly.
"""
import json

import numpy as np

from training.checkpointing import (find_latest_valid, host_rng_state, load_checkpoint, remove_incomplete,
                                    resolve_load, save_checkpoint, set_host_rng_state)
from training.config import load_config
from training.data.pipeline import build_data
from training.logger import RunLogger, model_flops_per_token
from training.optim import lr_schedule

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))


class Interrupted(Exception):
    pass


def train(cfg, stop_after=None):
    data = build_data(cfg, log=lambda line: None)
    v = cfg.model.vocab_size
    w, mom = np.zeros((v, v), np.float32), np.zeros((v, v), np.float32)
    np.random.seed(cfg.training.seed)
    step = 0
    path = resolve_load(cfg.checkpoint.load, cfg.checkpoint.dir)
    if path is not None:
        ck = load_checkpoint(path, expected_shapes={"w": (v, v)}, expected_optimizer_shapes={"mom": (v, v)},
                             expected_model_config=cfg.to_dict()["model"])
        w, mom, step = ck.model["w"], ck.optimizer["mom"], ck.step
        data.sampler.load_state_dict(ck.meta["sampler"])
        set_host_rng_state(ck.meta["rng"])
    remove_incomplete(cfg.checkpoint.dir)
    sched = lr_schedule(cfg.optimizer, cfg.training.train_iters)
    t = cfg.training
    log = RunLogger(cfg.logging.output_dir, total_steps=t.train_iters, tensorboard=cfg.logging.tensorboard,
                    flops_per_token=model_flops_per_token(cfg.model), peak_flops=1e12,
                    log_interval=cfg.logging.log_interval)
    while step < t.train_iters:
        lr = sched(step)
        grad, loss = np.zeros_like(w), 0.0
        for micro in data.sampler.next_step():
            x, y = data.train.batch(micro)
            logits = w[x]                                     # (B, S, V)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            loss += float(-np.log(np.take_along_axis(p, y[..., None], -1)).mean()) / t.grad_accum_steps
            p[np.arange(x.shape[0])[:, None], np.arange(x.shape[1]), y] -= 1.0
            np.add.at(grad, x.ravel(), p.reshape(-1, v) / (x.size * t.grad_accum_steps))
        grad += np.random.normal(scale=1e-6, size=grad.shape).astype(np.float32)  # uses the host RNG
        norm = float(np.sqrt((grad ** 2).sum()))
        grad *= min(1.0, cfg.optimizer.clip_grad / (norm + 1e-6))
        mom = cfg.optimizer.beta1 * mom + grad
        w = w - lr * mom
        step += 1
        log.step(step, loss, lr, norm, tokens=t.global_batch_size * cfg.model.seq_length, step_time=0.01)
        if step % cfg.checkpoint.save_interval == 0:
            save_checkpoint(cfg.checkpoint.dir, step, {"w": w}, {"mom": mom},
                            {"config": cfg.to_dict(), "sampler": data.sampler.state_dict(),
                             "rng": host_rng_state()}, keep_last=cfg.checkpoint.keep_last)
        if step == stop_after:
            log.close()
            raise Interrupted
    log.close()
    return w


def _cfg(tmp_path, run, corpus):
    return load_config(None, [
        f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=300",
        "model.seq_length=16", "model.max_position_embeddings=16", "training.train_iters=20",
        "training.micro_batch_size=2", "training.global_batch_size=4", "optimizer.lr=0.5",
        "optimizer.min_lr=0.05", "optimizer.warmup_iters=3", "checkpoint.save_interval=5",
        "checkpoint.keep_last=2", "checkpoint.load=auto", f"logging.output_dir={tmp_path / run}",
        "logging.log_interval=5"])


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_crash_and_auto_resume_reproduce_the_uninterrupted_run(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    w_full = train(_cfg(tmp_path, "full", corpus))
    cfg = _cfg(tmp_path, "crashy", corpus)
    try:
        train(cfg, stop_after=12)  # saved at 5 and 10, then "crashes" at 12
    except Interrupted:
        pass
    assert find_latest_valid(cfg.checkpoint.dir).name == "step_000010"
    w_resumed = train(_cfg(tmp_path, "crashy", corpus))  # load=auto picks step 10
    np.testing.assert_array_equal(w_full, w_resumed)
    full, crashy = _losses(tmp_path / "full"), _losses(tmp_path / "crashy")  # last record per step wins
    assert crashy == full and full[20] < full[1]
    out = capsys.readouterr().out
    assert "step 20/20 | loss" in out and "ETA" in out
    assert sorted(p.name for p in (tmp_path / "crashy" / "checkpoints").iterdir()) == ["step_000015", "step_000020"]
