"""One process that owns a compiled (or eager) train step and runs it on command.

``python benchmarks/train_step_worker.py CONFIG MODE``: builds the model of CONFIG and a
``TrainStep``, prints ``ready <tokens per step> <flops per token>``, then reads commands on
stdin, one per line: ``step`` -> runs one optimizer step on fixed random tokens and prints
``done <loss>``; ``stats`` -> prints ``rss <peak resident set size in bytes>``; ``gemm`` ->
prints ``gemm <FLOP/s of a 2048^2 fp32 numpy matmul> <same with MindSpore ops.matmul>`` (best
of 10 each) measured in this process
(same threads, same neighbours on a shared machine); ``quit``.
The execution mode is process-global, so each mode gets its own process.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(config: str, mode: str) -> None:
    import mindspore as ms
    import numpy as np

    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.logger import model_flops_per_token
    from training.model_bridge import build_gpt
    from training.step import TrainStep, set_mode

    ms.set_device("CPU")
    set_mode(mode)
    cfg = load_config(config, [f"training.mode={mode}"])
    model = build_gpt(cfg)  # the YAML's TransformerConfig, as training/pretrain.py builds it
    t = cfg.training
    step = TrainStep(model, ParallelDims.single(), cfg.optimizer, t.grad_accum_steps,
                     dtype=model.config.precision.compute_dtype)
    rng = np.random.default_rng(0)
    shape = (t.micro_batch_size, cfg.model.seq_length)
    batches = [(rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32),
                rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32))
               for _ in range(t.grad_accum_steps)]
    print(f"ready {t.global_batch_size * cfg.model.seq_length} {model_flops_per_token(cfg.model)}",
          flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            loss, _ = step(batches, 1e-4)
            print(f"done {loss}", flush=True)
        elif cmd == "stats":
            print(f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)
        elif cmd == "gemm":
            from benchmarks.bench_train_step import gemm_flops, ms_gemm_flops

            print(f"gemm {gemm_flops()} {ms_gemm_flops()}", flush=True)
        elif cmd == "quit":
            return
        else:
            raise ValueError(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
