"""Distributed optimizer (ZeRO-1): peak memory per rank and step time, dp=2 with and without.

The benchmark model of configs/tiny_llama_bench.yaml (vocab 32000, hidden 512, 4 layers,
44.0 M parameters), with a small batch (micro-batch 1 x 128 tokens) so that activations do
not hide the optimizer state. Each variant is one msrun launch of 2 ranks
(``benchmarks/zero_worker.py``: one compile step, then ``STEPS`` timed steps). Printed per
variant: median step time of rank 0 (measured inside the worker; pytest-benchmark's own time
is the whole launch, compile included), the peak RSS of each rank (``ru_maxrss``: resident-set
high-water mark, compile included) and, beside them, the theoretical bytes per parameter:

    without:  4 (fp32 weight, also the master) + 4 (gradient buffer) + 8 (two Adam moments) = 16
    with:     4 + 4 + 8 / dp                                        = 12 at dp=2

so the theory saves ``8 (1 - 1/dp)`` bytes per parameter (168 MiB per rank here). The measured
RSS difference also carries the update graphs' transients and MindSpore's allocator slack.
Measured once on the shared 2-core machine (load average ~6): without 4.4 s/step and 8.1 GB
peak RSS per rank, with 8.6 s/step and 5.5 GB: ~2.6 GB saved per rank, far more than the
moments alone. Our reading (not profiled): the non-distributed update is one graph over the
whole model (all-reduced gradients and new moments of every parameter), the distributed one
works through bucket-sized pieces. The step is slower on CPU: the reduce-scatter and the
all-gather are each a SUM all-reduce of the whole padded bucket (``mcore/comm/collectives.py``),
two passes over the model where the non-distributed step makes one. Run alone::

    .venv/bin/python -m pytest benchmarks/bench_zero.py --benchmark-enable -s
"""
from __future__ import annotations

import json
import statistics

import pytest

from tests.msrun_util import msrun_command, run_msrun, worker_logs
from tests.multirank import REPO_ROOT

CONFIG = str(REPO_ROOT / "configs" / "tiny_llama_bench.yaml")
WORKER = str(REPO_ROOT / "benchmarks" / "zero_worker.py")
OVERRIDES = ["training.micro_batch_size=1", "training.global_batch_size=2", "model.seq_length=128"]
STEPS = 3


def theory_bytes_per_param(distributed: bool, dp: int) -> float:
    """fp32 weight + fp32 gradient buffer + the two fp32 Adam moments (split over dp)."""
    return 4 + 4 + (8 / dp if distributed else 8)


def _launch(tmp, distributed: bool) -> list[dict]:
    out = tmp / ("zero" if distributed else "plain")
    out.mkdir()
    args = [CONFIG, "true" if distributed else "false", str(out), STEPS, *OVERRIDES]
    res = run_msrun(msrun_command(WORKER, args, workers=2), cwd=tmp, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + worker_logs(tmp / "logs")[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def results():
    return {}


@pytest.mark.parametrize("distributed", [False, True], ids=["dp2", "dp2_distributed"])
def test_zero_memory_and_step_time(benchmark, results, tmp_path, distributed):
    ranks = benchmark.pedantic(_launch, args=(tmp_path, distributed), rounds=1, iterations=1)
    results[distributed] = ranks
    step = statistics.median(ranks[0]["step_s"])
    rss = [r["peak_rss"] for r in ranks]
    n = ranks[0]["params"]
    theory = theory_bytes_per_param(distributed, 2)
    benchmark.extra_info.update(step_s=step, peak_rss_gb=[x / 2 ** 30 for x in rss],
                                theory_bytes_per_param=theory, params=n,
                                moment_elements=ranks[0]["moment_elements"])
    line = (f"\n{'with' if distributed else 'without'} distributed optimizer: {step:.2f} s/step "
            f"(rank 0 median of {STEPS}) | peak RSS per rank "
            f"{', '.join(f'{x / 2 ** 30:.2f}' for x in rss)} GB | theory {theory:g} B/param = "
            f"{theory * n / 2 ** 20:.0f} MiB of {n / 1e6:.1f} M params")
    if False in results and True in results:
        saved = [(a["peak_rss"] - b["peak_rss"]) / 2 ** 20
                 for a, b in zip(results[False], results[True])]
        want = (theory_bytes_per_param(False, 2) - theory_bytes_per_param(True, 2)) * n / 2 ** 20
        line += (f"\n  peak RSS saved per rank: {', '.join(f'{x:.0f}' for x in saved)} MiB "
                 f"(theory {want:.0f} MiB)")
    print(line)
