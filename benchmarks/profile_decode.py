"""Per-op profile of the compiled 1-token greedy decode step (CPU).

``python benchmarks/profile_decode.py [--batch 1] [--steps 20] [--out DIR]`` builds the Llama
of ``benchmarks/bench_decode.py``, compiles its bucket with one ``models.generate`` call, then
times ``--steps`` 1-token steps chained on the device as ``CompiledDecoder.greedy`` runs them
(the argmax and positions of a step feed the next), first unprofiled, then under MindSpore's
profiler (``mindspore.profiler.profile``, CPU activity), and prints a markdown table: kernels
per step and ms per step of each part (the profiler's ``FRAMEWORK/cpu_op_detail_info_0.csv``,
as ``profile_step.py`` reads it; a kernel's scope name says which layer and Cell it belongs
to). The difference between the unprofiled step and the sum of the kernels is dispatch and
host time. Run it from a temporary directory; on a shared machine only the shares mean much.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = (("output_layer", "output layer"), ("linear_fc1", "linear_fc1"),
         ("linear_fc2", "linear_fc2"), ("linear_qkv", "linear_qkv"),
         ("linear_proj", "linear_proj"), ("core_attention", "attention (scores, mask, softmax)"),
         ("cache-", "KV cache writes"), ("norm", "RMSNorm"), ("mlp", "SwiGLU"),
         ("self_attention", "q/k/v split and rotary"))


def part(op_type: str, scope: str) -> str:
    """The part of the step a kernel belongs to, from its scope name."""
    for key, name in PARTS:
        if key in scope:
            return name
    return f"other ({op_type})"


def table(directory: str, steps: int) -> str:
    """The markdown table of the profile in ``directory`` (``profile_step.table`` with this
    file's parts, in ms to three decimals)."""
    from benchmarks.profile_step import table as profile_table
    return profile_table(directory, steps, part, digits=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None,
                        help="profiler output directory (default: a temporary one)")
    args = parser.parse_args()

    import mindspore as ms
    import numpy as np
    from mindspore.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    ms.set_device("CPU")
    import models
    from benchmarks.bench_decode import HF_CONFIG, NEW, PROMPT

    model = models.build_from_config(HF_CONFIG)
    prompts = np.random.default_rng(0).integers(3, 32000, (args.batch, PROMPT)).astype(np.int32)
    models.generate(model, prompts, NEW)  # compiles the bucket's graphs
    decoder, = model.__dict__["_compiled_decoders"].values()
    key_mask = decoder.full_mask(np.ones((args.batch, PROMPT), np.int32))

    def steps(prof=None):
        decoder.start()
        ids = ms.Tensor(prompts[:, -1:])
        pos = ms.Tensor(np.full((args.batch, 1), PROMPT, np.int32))
        for _ in range(args.steps):
            ids, pos, _ = decoder.step(ids, pos, key_mask)
            if prof is not None:
                prof.step()
        ids.asnumpy()

    times = []
    for _ in range(3):
        start = time.perf_counter()
        steps()
        times.append(1e3 * (time.perf_counter() - start) / args.steps)
    print(f"batch {args.batch}: unprofiled {', '.join(f'{t:.2f}' for t in times)} ms per step")
    out = args.out or tempfile.mkdtemp(prefix="profile_decode_")
    trace = tensorboard_trace_handler(out)
    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=trace) as prof:
        steps(prof)
    print(table(out, args.steps))


if __name__ == "__main__":
    main()
