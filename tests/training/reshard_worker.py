"""Load several checkpoints in turn into ONE training setup (built and compiled once) and run 3
steps from each (a ``msrun`` worker, or plain ``python`` for one process).

    python tests/training/reshard_worker.py OUT.json CKPT1,CKPT2,... key=value ...

For each checkpoint: load this rank's slices (``training.checkpointing.load_train_state``),
check the loaded weights are bit-equal to the slices of the saved whole model
(``load_checkpoint``: global tensors), restore sampler and host RNG, run 3 steps. Rank 0 writes
``{checkpoint: {"losses": {step: loss}, "weights_equal": bool}}`` to OUT.json (every rank's
weight check is all-reduced first)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


def local_of(full: np.ndarray, spec) -> np.ndarray:
    """The slice of ``full`` a rank with ``spec`` holds (independent of the loader's code)."""
    out = np.zeros(spec.local_shape, full.dtype)
    for b in spec.blocks:
        dst = tuple(slice(s, s + n) for s, n in zip(b.local_start, b.shape))
        out[dst] = full[tuple(slice(s, s + n) for s, n in zip(b.global_start, b.shape))]
    return out


def main(out: str, ckpts: str, *overrides: str) -> None:
    import mindspore as ms

    from mcore.comm import all_reduce
    from training.checkpoint_layout import chunk_models, param_entries
    from training.checkpointing import load_checkpoint, load_train_state, set_host_rng_state
    from training.data.pipeline import build_data
    from training.optim import lr_schedule
    from training.pretrain import build_dims, build_model, build_step, parse_args

    cfg = parse_args(list(overrides))  # the world size from the launcher
    dims = build_dims(cfg)
    ms.set_seed(cfg.training.seed)
    data = build_data(cfg, rank=dims.global_rank, dp_rank=dims.dp.rank, log=lambda s: None)
    step_fn = build_step(cfg, build_model(cfg, dims), dims, data.sampler.grad_accum_steps)
    specs = {n: e.spec for n, e in param_entries(chunk_models(step_fn), dims).items()}
    schedule = lr_schedule(cfg.optimizer, cfg.training.train_iters)
    results = {}
    for path in ckpts.split(","):
        state = load_train_state(path, step_fn, dims, model_config=cfg.to_dict()["model"])
        saved = load_checkpoint(path).model  # whole tensors
        mine = step_fn.model_state()
        equal = all(np.array_equal(mine[n], local_of(saved[n], specs[n])) for n in mine)
        if dims.world_size > 1:
            bad = all_reduce(ms.Tensor(float(not equal), ms.float32), dims.world).asnumpy()
            equal = float(bad) == 0.0
        data.sampler.load_state_dict(state["sampler"])
        set_host_rng_state(state["rng"])
        losses, step = {}, state["step"]
        for _ in range(3):
            micro = [data.train.batch(ids) for ids in data.sampler.next_step()]
            loss, _ = step_fn(micro, schedule(step))
            step += 1
            losses[step] = loss
        results[path] = {"losses": losses, "weights_equal": bool(equal)}
    if dims.global_rank == 0:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
