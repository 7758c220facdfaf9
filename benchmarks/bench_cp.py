"""Context-parallel attention: peak memory per rank and step time, cp=1 vs cp=2 ring vs a2a.

One causal attention (``SEQ`` = 4096 tokens, 8 query heads, 2 key/value heads, head dim 64,
fp32, batch 1), forward+backward in PyNative (gradients of q, k, v), on 2 real ranks; each row
is one msrun launch of ``benchmarks/cp_worker.py``:

- ``cp1``: each rank attends over the whole sequence alone (``CoreAttention``, no
  communication): the reference;
- ``cp2_ring`` / ``cp2_a2a``: the sequence is split over both ranks
  (``mcore.transformer.context_parallel.CPAttention``).

Printed per row: median step time of rank 0 (``STEPS`` calls after one untimed call),
``vs_cp1`` (the cp1 step time over the row's, same run), per rank the peak RSS (``ru_maxrss``)
and its growth over the RSS before the first call (what the attention added), beside the
theoretical activation bytes per rank (``theory_bytes``): the score / probability matrices
that are alive at once and the key/value bytes a rank holds. Only the ratios of one run mean
anything on a shared machine. Run alone (``MSF_BENCH_CP_SEQ`` sets another length)::

    .venv/bin/python -m pytest benchmarks/bench_cp.py --benchmark-enable -s
"""
from __future__ import annotations

import json
import os
import statistics

import pytest

from tests.msrun_util import msrun_command, run_msrun, worker_logs
from tests.multirank import REPO_ROOT

WORKER = str(REPO_ROOT / "benchmarks" / "cp_worker.py")
SEQ = int(os.environ.get("MSF_BENCH_CP_SEQ", "4096"))
HEADS, KV_HEADS, HEAD_DIM, STEPS, CP = 8, 2, 64, 3, 2
ROWS = [("cp1", "full"), ("cp2_ring", "ring"), ("cp2_a2a", "a2a")]
FP32 = 4
BLOCK = 1024  # CoreAttention's default query block, also the ring's


def theory_bytes(kind: str, s: int = SEQ, cp: int = CP, n: int = HEADS, n_kv: int = KV_HEADS,
                 d: int = HEAD_DIM) -> dict:
    """Activation bytes per rank of one attention call (batch 1, fp32).

    ``scores``: score / probability elements alive at the peak. The composed full attention
    keeps the probabilities of every query block for the backward (``n s^2``); a2a runs it on
    ``n / cp`` heads of the full sequence; ring keeps none (its backward recomputes them) and
    holds one block of ``n x BLOCK x s / cp`` at a time. ``kv``: keys and values held: the whole
    sequence (full), the full sequence of ``max(n_kv / cp, 1)`` heads (a2a), two ``s / cp``
    blocks (ring: its own and the travelling one).
    """
    if kind == "full":
        return {"scores": FP32 * n * s * s, "kv": FP32 * 2 * n_kv * s * d}
    if kind == "a2a":
        return {"scores": FP32 * (n // cp) * s * s, "kv": FP32 * 2 * max(n_kv // cp, 1) * s * d}
    return {"scores": FP32 * n * min(BLOCK, s // cp) * (s // cp),
            "kv": FP32 * 2 * 2 * n_kv * (s // cp) * d}


def _launch(tmp, kind: str) -> list[dict]:
    out = tmp / kind
    out.mkdir()
    args = [kind, SEQ, HEADS, KV_HEADS, HEAD_DIM, STEPS, str(out)]
    res = run_msrun(msrun_command(WORKER, args, workers=CP), cwd=tmp, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + worker_logs(tmp / "logs")[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(CP)]


@pytest.fixture(scope="module")
def results():
    return {}


@pytest.mark.parametrize("row,kind", ROWS, ids=[r for r, _ in ROWS])
def test_cp_attention_memory_and_step_time(benchmark, results, tmp_path, row, kind):
    ranks = benchmark.pedantic(_launch, args=(tmp_path, kind), rounds=1, iterations=1)
    step = statistics.median(ranks[0]["step_s"])
    results[row] = step
    peak = [r["peak_rss"] / 2 ** 20 for r in ranks]
    grown = [(r["peak_rss"] - r["base_rss"]) / 2 ** 20 for r in ranks]
    theory = {k: v / 2 ** 20 for k, v in theory_bytes(kind).items()}
    info = {"step_s": round(step, 3), "peak_rss_mib": [round(x) for x in peak],
            "rss_growth_mib": [round(x) for x in grown],
            "theory_mib": {k: round(v, 1) for k, v in theory.items()}}
    if "cp1" in results:
        info["vs_cp1"] = round(results["cp1"] / step, 3)
    benchmark.extra_info.update(info)
    print(f"\n{row:>9} (seq {SEQ}): {step:.2f} s/step | peak RSS per rank "
          f"{', '.join(f'{x:.0f}' for x in peak)} MiB (grew {', '.join(f'{x:.0f}' for x in grown)}"
          f" MiB) | theory scores {theory['scores']:.0f} MiB, kv {theory['kv']:.1f} MiB"
          + (f" | vs cp1 {info['vs_cp1']}x" if "vs_cp1" in info else ""))
