"""One rank of the context-parallel benchmark (``benchmarks/bench_cp.py``), run by msrun.

``msrun ... benchmarks/cp_worker.py KIND SEQ HEADS KV_HEADS HEAD_DIM STEPS OUT_DIR``: ``KIND``
``full`` (cp=1: every rank attends over the whole sequence alone, no communication), ``ring``
or ``a2a`` (cp = world size). Each rank draws q, k, v ``[1, heads, SEQ / cp, HEAD_DIM]`` and
times ``STEPS`` PyNative forward+backward calls of ``sum(attention(q, k, v) * w)`` (gradients
for q, k, v) after one untimed call. Writes ``OUT_DIR/rank<r>.json``: ``{"step_s": [...],
"base_rss": bytes resident before the first call, "peak_rss": ru_maxrss after the last}``.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(kind: str, seq: int, heads: int, kv_heads: int, head_dim: int, steps: int,
         out_dir: str) -> None:
    import mindspore as ms
    import numpy as np

    from mcore.distributed_env import init_if_needed
    from mcore.fusions.attention import CoreAttention
    from mcore.parallel_state import ParallelDims
    from mcore.transformer.context_parallel import CPAttention

    world, _ = init_if_needed()
    dims = ParallelDims.build(cp=1 if kind == "full" else world)
    cp = dims.cp
    scale = head_dim ** -0.5
    if kind == "full":
        attend = CoreAttention(heads, scale)
    else:
        attend = CPAttention(kind, cp, CoreAttention(heads, scale), heads, kv_heads)
    rng = np.random.default_rng(dims.global_rank)
    s_local = seq // cp.size
    q, w = (ms.Tensor(rng.standard_normal((1, heads, s_local, head_dim)).astype(np.float32))
            for _ in range(2))
    k, v = (ms.Tensor(rng.standard_normal((1, kv_heads, s_local, head_dim)).astype(np.float32))
            for _ in range(2))

    def objective(q, k, v):
        return (attend(q, k, v) * w).sum()

    grad = ms.value_and_grad(objective, grad_position=(0, 1, 2))
    base = _rss_now()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        _, grads = grad(q, k, v)
        for g in grads:
            g.asnumpy()
        if i:
            times.append(time.perf_counter() - t0)
    out = {"step_s": times, "base_rss": base,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(out_dir, f"rank{dims.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]), a[6])
