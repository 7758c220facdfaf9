"""Training-step speed and peak memory of configs/tiny_llama_bench.yaml, graph vs PyNative.

The model of docs/mindspore_cpu.md: vocab 32000, hidden 512, 4 layers, 8 heads (2 kv),
ffn 1408, seq 256, micro-batch 4, fp32, forward + backward + AdamW (training/step.py). Each mode
runs in its own worker process (``benchmarks/train_step_worker.py``; the mode is process-global);
pytest-benchmark times one ``step`` command round trip (the pipe costs microseconds against
a step of seconds). Printed beside each: tokens/s, peak RSS of the worker, and MFU against the
reference, this machine's fp32 GEMM rate (numpy 2048 x 2048 matmul, best of 10) measured in the
same worker right after the timed steps, so that both see the same load on a shared machine.
MindSpore's own 2048^2 matmul rate is printed as a second reference: on some CPUs numpy's
OpenBLAS picks a generic kernel (measured: numpy 25 vs MindSpore 80 GFLOP/s on an AVX-512 Xeon).
The load average is printed too: on a loaded machine a 2-thread BLAS GEMM suffers more than the
step does (its threads wait on each other), and MFU can even read above 100%; compare runs on an
idle machine (docs/mindspore_cpu.md: graph 1.57 s/step, numpy 288-329 GFLOP/s).

    .venv/bin/python -m pytest benchmarks/bench_train_step.py --benchmark-enable -s
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.multirank import REPO_ROOT

CONFIG = str(REPO_ROOT / "configs" / "tiny_llama_bench.yaml")


def gemm_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a float32 ``n x n`` numpy matmul (best of ``repeats``)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def ms_gemm_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a float32 ``n x n`` MindSpore ``ops.matmul`` (eager call, best of ``repeats``)."""
    import mindspore as ms
    from mindspore import ops

    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ops.matmul(a, a).asnumpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


class Worker:
    def __init__(self, mode: str, cwd):
        # cwd: a scratch directory (MindSpore writes rank_0/ there)
        self.proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "benchmarks" / "train_step_worker.py"),
                                      CONFIG, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=cwd)
        ready = self._read("ready")
        self.tokens, self.flops_per_token = int(ready[0]), float(ready[1])

    def _read(self, tag: str) -> list[str]:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return line.split()[1:]
        raise RuntimeError(f"train_step_worker exited ({self.proc.wait()}) before '{tag}'")

    def ask(self, cmd: str, tag: str) -> list[str]:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read(tag)

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_train_step(benchmark, mode, tmp_path):
    worker = Worker(mode, tmp_path)
    try:
        worker.ask("step", "done")  # compile / warm up
        benchmark.pedantic(lambda: worker.ask("step", "done"), rounds=3 if mode == "graph" else 2,
                           iterations=1)
        rss = int(worker.ask("stats", "rss")[0])
        reference_flops, ms_flops = map(float, worker.ask("gemm", "gemm"))
    finally:
        worker.close()
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
        return
    seconds = benchmark.stats.stats.min
    tokens_per_s = worker.tokens / seconds
    mfu = worker.flops_per_token * tokens_per_s / reference_flops
    load = os.getloadavg()[0]  # on a shared machine both numbers depend on the neighbours
    benchmark.extra_info.update(tokens_per_s=tokens_per_s, peak_rss_gb=rss / 2 ** 30, mfu=mfu,
                                gemm_gflops=reference_flops / 1e9, ms_gemm_gflops=ms_flops / 1e9,
                                mfu_vs_ms_gemm=worker.flops_per_token * tokens_per_s / ms_flops,
                                load_average=load)
    print(f"\n{mode:>8}: {seconds:.2f} s/step | {tokens_per_s:,.0f} tok/s | peak RSS {rss / 2 ** 30:.2f} GB"
          f" | MFU {100 * mfu:.1f}% of numpy fp32 GEMM {reference_flops / 1e9:.0f} GFLOP/s"
          f" ({100 * worker.flops_per_token * tokens_per_s / ms_flops:.1f}% of MindSpore's"
          f" {ms_flops / 1e9:.0f})"
          f" | load average {load:.1f} on {os.cpu_count()} cores")
