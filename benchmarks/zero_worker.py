"""One rank of the distributed-optimizer benchmark (``benchmarks/bench_zero.py``), run by msrun.

``msrun ... benchmarks/zero_worker.py CONFIG DISTRIBUTED OUT_DIR STEPS [key=value ...]``: builds
the model of CONFIG (with the overrides) on this rank's dp group, a ``TrainStep`` with
``optimizer.distributed=DISTRIBUTED`` (``true`` / ``false``), runs one untimed step (compile)
and ``STEPS`` timed ones on fixed random tokens, and writes ``OUT_DIR/rank<r>.json``:
``{"step_s": [...], "peak_rss": bytes (ru_maxrss: the process's resident-set high-water mark,
compile included), "params": n, "moment_elements": elements of Adam moments this rank holds}``.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(config: str, distributed: str, out_dir: str, steps: int, overrides: list[str]) -> None:
    import numpy as np

    from mcore.parallel_state import ModelGroups, ParallelDims
    from training.config import load_config
    from training.model_bridge import build_gpt
    from training.step import TrainStep, set_mode

    dims = ParallelDims.build()
    set_mode("graph")
    cfg = load_config(config, [f"optimizer.distributed={distributed}", *overrides],
                      world_size=dims.world_size)
    model = build_gpt(cfg, groups=ModelGroups.from_dims(dims))
    t = cfg.training
    step = TrainStep(model, dims, cfg.optimizer, t.grad_accum_steps,
                     dtype=model.config.precision.compute_dtype)
    rng = np.random.default_rng(dims.dp.rank)
    shape = (t.micro_batch_size, cfg.model.seq_length)
    batches = [(rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32),
                rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32))
               for _ in range(t.grad_accum_steps)]
    step(batches, 1e-4)  # compile
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batches, 1e-4)
        times.append(time.perf_counter() - t0)
    moments = sum(int(np.prod(m.shape)) for m in step.update.m) * 2
    out = {"step_s": times, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "params": sum(int(np.prod(p.shape)) for _, p in step.named), "moment_elements": moments}
    Path(out_dir, f"rank{dims.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
