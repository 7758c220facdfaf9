"""Validation loss and perplexity of a trained checkpoint on the held-out split.

    python training/evaluate.py --config configs/tiny_llama_demo.yaml [checkpoint.load=DIR] \\
        [training.eval_iters=N]

``checkpoint.load``: a ``step_NNNNNN`` directory, or ``auto``/``none`` (both mean the newest
valid checkpoint under ``checkpoint.dir`` / ``<logging.output_dir>/checkpoints``).
``training.eval_iters=0`` evaluates every validation sample (in whole micro-batches).
Any ``parallel`` layout (tp, pp, vpp, layers_per_stage, one process or several) reads a
checkpoint saved on any other (``mcore.checkpoint`` reshards on load; ``msrun`` works as for
pretrain.py; with pp > 1 the validation batches run forward-only through the pipeline schedule). Prints ``valid loss 4.1234 | ppl 61.80 | N tokens | <checkpoint>``
on rank 0 and exits 0. Bad input (a config key, a path, no checkpoint to evaluate, a checkpoint
that does not fit) prints ``<kind> error: <one line naming the key or file>`` and exits 2; the
checkpoint is looked up before the model is built.

Tasks (multiple-choice accuracy by log-likelihood, exact match of greedy answers) on a JSON
Lines file, from a Hugging Face directory or a training checkpoint (``training.eval_tasks``)::

    python training/evaluate.py --tasks tasks.jsonl --model HF_DIR_OR_CHECKPOINT \\
        [--adapter LORA_DIR] [--output results.json]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import ConfigError
from training.errors import exit_on_user_error
from training.pretrain import build_dims, build_model, build_step, checkpoint_root, config_or_exit


def checkpoint_path(cfg) -> Path:
    """The checkpoint to evaluate: ``checkpoint.load``, or for ``none`` / ``auto`` the newest valid
    one under the checkpoint root; ``CheckpointError`` naming the root if there is none."""
    from training.checkpointing import CheckpointError, resolve_load

    load = "auto" if cfg.checkpoint.load in ("none", "auto") else cfg.checkpoint.load
    path = resolve_load(load, checkpoint_root(cfg))
    if path is None:
        raise CheckpointError(f"no valid checkpoint under '{checkpoint_root(cfg)}' "
                              "(set checkpoint.load=DIR)")
    return path


def load_weights(step_fn, cfg, dims, path: Path | None = None) -> Path:
    """Load the model part of checkpoint ``path`` (default ``checkpoint_path(cfg)``) into the
    parameters of ``step_fn`` (a ``TrainStep`` or ``PipelineTrainStep``: this rank's stage);
    return the checkpoint path."""
    from training.checkpointing import load_train_state

    path = path if path is not None else checkpoint_path(cfg)
    load_train_state(path, step_fn, dims, model_config=cfg.to_dict()["model"], weights_only=True)
    return path


def evaluate(cfg) -> dict:
    """``{"loss", "ppl", "tokens", "checkpoint", "rank"}`` of the checkpoint on the validation split."""
    from training.data.pipeline import build_data

    path = checkpoint_path(cfg)
    dims = build_dims(cfg)
    data = build_data(cfg, rank=dims.global_rank, dp_rank=dims.dp.rank, log=lambda line: None)
    if data.eval_batches is None:
        raise ConfigError("data.valid_fraction=0: there is no validation split to evaluate")
    step_fn = build_step(cfg, build_model(cfg, dims), dims, grad_accum_steps=1)
    load_weights(step_fn, cfg, dims, path)
    t = cfg.training
    n = t.eval_iters or len(data.valid) // (t.micro_batch_size * dims.dp.size)
    if cfg.parallel.vpp > 1:  # the interleaved schedule runs micro-batches in groups of pp
        n -= n % dims.pp.size
    batches = [data.valid.batch(ids) for ids in data.eval_batches.batches(n)]
    loss = step_fn.evaluate(batches)
    tokens = n * t.micro_batch_size * dims.dp.size * cfg.model.seq_length
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens, "checkpoint": str(path),
            "rank": dims.global_rank}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--tasks" in argv or any(a.startswith("--tasks=") for a in argv):
        from training.eval_tasks import main as tasks_main

        return tasks_main(argv)
    cfg = config_or_exit(argv)
    with exit_on_user_error():
        result = evaluate(cfg)
    if result["rank"] == 0:
        print(f"valid loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | "
              f"{result['tokens']:,} tokens | {result['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
