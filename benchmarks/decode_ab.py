"""A/B of the compiled greedy decode step with and without one fused op, in one process.

``python benchmarks/decode_ab.py [--op small_matmul] [--seconds 60]`` builds the Llama of
``benchmarks/bench_decode.py`` twice with the same weights: A with every CPU kernel of
``mcore.fusions`` but ``--op`` (``MSFORMERS_FUSIONS=kernels:<the others>``; a comma-separated
list leaves out several, e.g. ``decode_layer,small_matmul``: the step with MindSpore's
``MatMul``), B with the default (``auto``). After a warm-up call per model and batch (compilation; the greedy tokens of
A and B are compared there), ``models.generate`` (32-token prompt, 64 new tokens) runs for
batch 1 and 8, A and B alternating, until ``--seconds`` have passed, so both see the same
machine load. Prints ms per new token (best and median) and the ratios A / B, with the load
averages; on a shared machine trust the medians of long runs, not single rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEW, PROMPT, BATCHES = 64, 32, (1, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", default="small_matmul",
                        help="the fused op A goes without (a comma-separated list: several)")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    import mindspore as ms
    import numpy as np

    ms.set_device("CPU")
    import models
    from benchmarks.bench_decode import HF_CONFIG
    from mcore.fusions.registry import ENV, REGISTRY

    left_out = args.op.split(",")
    unknown = [op for op in left_out if op not in REGISTRY]
    if unknown:
        raise SystemExit(f"--op {args.op!r}: {unknown} not registered fused ops "
                         f"({sorted(REGISTRY)})")
    before = os.environ.get(ENV)
    os.environ[ENV] = "kernels:" + ",".join(n for n in REGISTRY if n not in left_out)
    built = {"A": models.build_from_config(HF_CONFIG)}
    os.environ[ENV] = "auto"
    built["B"] = models.build_from_config(HF_CONFIG)
    if before is None:
        del os.environ[ENV]
    else:
        os.environ[ENV] = before
    prompts = np.random.default_rng(0).integers(3, 32000, (max(BATCHES), PROMPT)).astype(np.int32)
    for b in BATCHES:
        a, bb = (np.array(models.generate(built[k], prompts[:b], NEW)) for k in "AB")
        print(f"batch {b}: greedy tokens of A and B equal {np.mean(a == bb):.0%}", flush=True)
    times = {(k, b): [] for k in "AB" for b in BATCHES}
    end = time.time() + args.seconds
    while time.time() < end:
        for b in BATCHES:
            for k in "AB":
                start = time.perf_counter()
                models.generate(built[k], prompts[:b], NEW)
                times[(k, b)].append(1e3 * (time.perf_counter() - start) / NEW)
    print(f"A: without {args.op}; B: default. Load averages {os.getloadavg()}")
    for b in BATCHES:
        a, bb = times[("A", b)], times[("B", b)]
        print(f"batch {b}, ms per new token (rounds {len(a)}): A best {min(a):.2f} median "
              f"{statistics.median(a):.2f} | B best {min(bb):.2f} median "
              f"{statistics.median(bb):.2f}"
              f" | A / B best {min(a) / min(bb):.2f}x median "
              f"{statistics.median(a) / statistics.median(bb):.2f}x")


if __name__ == "__main__":
    main()
