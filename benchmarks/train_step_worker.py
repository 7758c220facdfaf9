"""One process that owns a compiled (or eager) train step and runs it on command.

``python benchmarks/train_step_worker.py CONFIG MODE``: builds the model of CONFIG and a
``TrainStep``, prints ``ready <tokens per step> <flops per token>``, then reads commands on
stdin, one per line: ``step`` -> runs one optimizer step on fixed random tokens and prints
``done <loss>``; ``stats`` -> prints ``rss <peak resident set size in bytes>``; ``export DIR``
-> writes the current weights (a Hugging Face directory), the batch and the optimizer settings
for ``benchmarks/torch_twin.py`` and prints ``exported``; ``phases`` -> runs one step in its
parts and prints ``phases <forward s> <forward+backward s> <update s>`` (the forward alone is
a separate compiled graph, compiled untimed, then timed; backward = second - first);
``update_parts`` -> runs forward+backward untimed, then the update's graphs one by one
(``training/adamw.py``) and prints ``update_parts <finalise s> <AdamW + zeroing s> <zeroing
alone s>`` (the last one a ``ZeroGrads`` run on the zeroed buffers); ``gemm`` ->
prints ``gemm <FLOP/s of a 2048^2 fp32 numpy matmul> <same with MindSpore ops.matmul>`` (best
of 10 each) measured in this process
(same threads, same neighbours on a shared machine); ``quit``.
The execution mode is process-global, so each mode gets its own process.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def export(directory: str, model, batches, opt, lr: float) -> None:
    """The inputs of ``benchmarks/torch_twin.py`` (see its docstring) in ``directory``."""
    import numpy as np

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (inputs, labels), = batches  # the twin runs one micro-batch per step
    np.savez(out / "batch.npz", inputs=inputs, labels=labels)
    (out / "bench.json").write_text(json.dumps({
        "lr": lr, "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps,
        "weight_decay": opt.weight_decay, "clip_grad": opt.clip_grad, "threads": None}))


def phases(step, batches, lr: float) -> tuple[float, float, float]:
    """Seconds of the forward alone, of forward + backward (``ForwardBackward``) and of the
    update (``apply_update``) of one optimizer step (one micro-batch)."""
    import mindspore as ms

    (inputs, labels), = batches
    x, y = ms.Tensor(inputs, ms.int32), ms.Tensor(labels, ms.int32)
    step.loss_cell(x, y).asnumpy()  # the forward alone is its own graph: compile it untimed
    t0 = time.perf_counter()
    step.loss_cell(x, y).asnumpy()
    t1 = time.perf_counter()
    loss = float(step.forward_backward(x, y, ms.Tensor(1.0, ms.float32)).asnumpy())
    t2 = time.perf_counter()
    step.apply_update(lr, loss)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def update_parts(step, batches, lr: float) -> tuple[float, float, float]:
    """Seconds of the update's finalise graph, of its AdamW graph (which zeroes the buffers) and
    of the zeroing graph alone, after one untimed forward+backward (one micro-batch)."""
    import mindspore as ms

    (inputs, labels), = batches
    x, y = ms.Tensor(inputs, ms.int32), ms.Tensor(labels, ms.int32)
    loss = step.forward_backward(x, y, ms.Tensor(1.0, ms.float32))
    finalize, apply, zero_grads = step.update._graphs
    t0 = time.perf_counter()
    norm, _, coef = finalize(loss)
    norm.asnumpy()
    t1 = time.perf_counter()
    scalar = ms.Tensor(lr, ms.float32)  # lr', eps', wd': any values time the same
    apply(scalar, scalar, scalar, coef).asnumpy()
    t2 = time.perf_counter()
    zero_grads().asnumpy()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


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
        elif cmd.startswith("export "):
            export(cmd.split(maxsplit=1)[1], model, batches, cfg.optimizer, lr=1e-4)
            print("exported", flush=True)
        elif cmd == "phases":
            print("phases " + " ".join(f"{s:.6f}" for s in phases(step, batches, 1e-4)), flush=True)
        elif cmd == "update_parts":
            print("update_parts " + " ".join(f"{s:.6f}" for s in update_parts(step, batches, 1e-4)),
                  flush=True)
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
