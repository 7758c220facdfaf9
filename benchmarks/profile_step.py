"""Per-op profile of one compiled forward + backward of a config's training step (CPU).

``python benchmarks/profile_step.py CONFIG [--graph fb|fwd] [--steps N] [--out DIR]`` builds the
model and ``TrainStep`` as ``benchmarks/train_step_worker.py`` does, runs the graph twice
untimed (compilation, warm-up), then ``N`` times (default 2) under MindSpore's profiler
(``mindspore.profiler.profile``, CPU activity), and prints a markdown table: the time per
step of each part of the step, summed over the kernels MindSpore launched for it (the
profiler's ``FRAMEWORK/cpu_op_detail_info_0.csv``; a kernel's scope name says which layer and
Cell it belongs to). ``fb`` profiles ``ForwardBackward`` (forward, backward and the ``acc``
add), ``fwd`` the forward alone (``LossCell``). Kernels run one after another on the CPU
backend, so the parts add up to the graph's time; the profiler adds little (compare the
timed steps printed first). On a shared machine only the shares mean much.
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def part(op_type: str, scope: str) -> str:
    """The part of the step a kernel belongs to, from its type and scope name. The custom op
    of ``CpuMatmul`` is its backward (its forward is MindSpore's ``MatMul``); other Cells'
    backward kernels carry the prefix ``Gradients/``."""
    side = "backward" if scope.startswith("Gradients/") else "forward"
    if "CpuMatmul" in scope or "output_layer" in scope:
        which = "output layer" if "output_layer" in scope else "decoder linears"
        if op_type == "Custom":
            return f"{which} matmul backward (OpenBLAS dx, dw)"
        return f"{which} matmul forward (MatMul)" if op_type == "MatMul" else f"{which} other"
    for key, name in (("cross_entropy", "cross-entropy kernel"), ("CpuCausalAttention", "attention kernel"),
                      ("CpuRotary", "rotary kernel"), ("CpuSwiGLU", "SwiGLU kernel"),
                      ("norm", "RMSNorm (composed)"), ("embedding", "embedding")):
        if key in scope.lower() or key in scope:
            return f"{name} {side}"
    if scope.startswith("Expand/") and op_type == "ReduceSum":  # sums the compiler expanded
        return "ReduceSum without a Cell scope (backward sums, mostly RMSNorm's)"
    if op_type == "UnsortedSegmentSum":
        return "embedding backward"
    if "CpuAccAdd" in scope:
        return "acc add (acc_add kernel)"
    if scope.count("/") == 1 and op_type in ("AssignAdd", "Mul"):
        return f"acc add ({op_type})"
    return f"other {op_type} {side}"


def table(directory: str, steps: int, part_of=part, digits: int = 1) -> str:
    """The markdown table of the profile in ``directory``: part (``part_of(op_type, scope)``),
    kernels, ms per step (``digits`` decimals), share. ``profile_decode.py`` uses it too."""
    path, = glob.glob(f"{directory}/*/FRAMEWORK/cpu_op_detail_info_0.csv")
    ms_per_step, kernels = collections.defaultdict(float), collections.Counter()
    with open(path) as f:
        for row in csv.DictReader(f):
            name = part_of(row["op_type"], row["full_op_name"])
            ms_per_step[name] += float(row["op_total_time(ms)"]) / steps
            kernels[name] += int(row["op_occurrences"]) // steps
    total = sum(ms_per_step.values())
    lines = ["| part | kernels | ms per step | share |", "|---|---|---|---|"]
    lines += [f"| {name} | {kernels[name]} | {t:.{digits}f} | {100 * t / total:.1f} % |"
              for name, t in sorted(ms_per_step.items(), key=lambda item: -item[1])]
    lines.append(f"| all kernels | {sum(kernels.values())} | {total:.{digits}f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--graph", choices=("fb", "fwd"), default="fb")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None, help="profiler output directory (default: a temporary one)")
    args = parser.parse_args()

    import mindspore as ms
    import numpy as np
    from mindspore.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.model_bridge import build_gpt
    from training.step import TrainStep, set_mode

    ms.set_device("CPU")
    set_mode("graph")
    cfg = load_config(args.config, ["training.mode=graph"])
    model = build_gpt(cfg)
    step = TrainStep(model, ParallelDims.single(), cfg.optimizer, 1,
                     dtype=model.config.precision.compute_dtype)
    rng = np.random.default_rng(0)
    shape = (cfg.training.micro_batch_size, cfg.model.seq_length)
    x, y = (ms.Tensor(rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32)) for _ in range(2))
    one = ms.Tensor(1.0, ms.float32)

    def run():
        if args.graph == "fwd":
            return step.loss_cell(x, y).asnumpy()
        return step.forward_backward(x, y, one).asnumpy()

    for _ in range(2):  # compilation and warm-up
        run()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(f"{args.graph}: unprofiled steps {', '.join(f'{t:.3f}' for t in times)} s")
    out = args.out or tempfile.mkdtemp(prefix="profile_step_")
    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=tensorboard_trace_handler(out)) as prof:
        for _ in range(args.steps):
            run()
            prof.step()
    print(table(out, args.steps))


if __name__ == "__main__":
    main()
