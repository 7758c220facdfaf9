"""MoELayer forward+backward tokens/s on 2 real ranks: allgather vs alltoall at ep=2,
GroupedMLP vs SequentialMLP, each beside a dense MLP of the same active FLOPs.

Layer: hidden 128, 4 experts of SwiGLU ffn 256, top-2, fp32, 2 x 128 = 256 tokens per rank
(each rank draws its own tokens, so the routing is uneven). The objective is
``mean(y^2) + aux.sum()``; one call is ``value_and_grad`` over the layer's weights.

This pytest process is rank 0 of a real 2-rank job (rank 1 and the scheduler are
subprocesses running this file). In the untimed ``setup`` of every round rank 0 names the row
to rank 1 (a one-float all-reduce), then both ranks run the row's reference row (timed by
hand), then pytest-benchmark times the row itself. References are thus measured in the same
rounds, interleaved, under the same load, with both ranks always doing the same work. Rows
(``CASES``, the fastest of ``ROUNDS`` rounds is reported):

- ``dense`` (PyNative and jit): a SwiGLU MLP of width ``top_k * ffn`` = 512 on the same
  tokens, the expert matmul FLOPs of the MoE layer (the router's ``2 h E`` per token, 0.4% of
  them, is not in it). Reference of every layer row of the same mode: ``vs_dense`` = the
  row's tokens/s over the dense tokens/s.
- ``ep1_grouped``: each rank alone holds all 4 experts (no communication).
- ``ep2_*``: expert parallel over both ranks (2 experts each): the all-gather dispatcher
  (PyNative and jit), the all-to-all dispatcher (PyNative; it reads counts on the host) with
  GroupedMLP and with SequentialMLP.
- ``exchange_*``: dispatch -> combine with identity experts, forward+backward, at ep=2: the
  token movement alone; ``share_of_reference`` = its time over the ep2 GroupedMLP layer row
  of the same dispatcher.
- ``counts_sync``: the all-to-all dispatcher's host synchronisation, the all-gather of the
  ``[E]`` counts read back to numpy; share of the all-to-all exchange.

Results go to ``extra_info`` and are printed. On a shared machine only the ratios mean
anything (docs/moe.md has a run and what it shows). Run alone (it initialises communication
in this process)::

    .venv/bin/python -m pytest benchmarks/bench_moe.py --benchmark-enable -s
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.comm_ops import next_command  # noqa: E402
from tests.multirank import free_port, rank_env  # noqa: E402

H, E, K, FFN, B, S = 128, 4, 2, 256, 2, 128
TOKENS = B * S  # per rank
STOP = -1.0
ROUNDS = 3  # the fastest round is reported: the least disturbed by other processes
# (row, mode, dispatcher, experts, ep, reference row index or None); dispatcher None = dense MLP
CASES = [
    ("dense", "pynative", None, None, 1, None),
    ("dense", "jit", None, None, 1, None),
    ("ep1_grouped", "pynative", "AllToAllDispatcher", "GroupedMLP", 1, 0),
    ("ep2_allgather_grouped", "pynative", "AllGatherDispatcher", "GroupedMLP", 2, 0),
    ("ep2_allgather_grouped", "jit", "AllGatherDispatcher", "GroupedMLP", 2, 1),
    ("ep2_alltoall_grouped", "pynative", "AllToAllDispatcher", "GroupedMLP", 2, 0),
    ("ep2_alltoall_sequential", "pynative", "AllToAllDispatcher", "SequentialMLP", 2, 0),
    ("exchange_allgather", "pynative", "AllGatherDispatcher", None, 2, 3),
    ("exchange_alltoall", "pynative", "AllToAllDispatcher", None, 2, 5),
    ("counts_sync", "pynative", "AllToAllDispatcher", None, 2, 8),
]
IDS = [f"{row}-{mode}" for row, mode, *_ in CASES]


def _config():
    from mcore.transformer.config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4,
                             ffn_hidden_size=K * FFN)


def _value_and_grad(cell, mode, moe: bool):
    import mindspore as ms

    def loss(x):
        out = cell(x)
        y = out[0] if moe else out
        return (y * y).mean() + (out[1].sum() if moe else 0.0)

    fn = ms.value_and_grad(loss, grad_position=None, weights=cell.trainable_params())
    return ms.jit(fn) if mode == "jit" else fn


def _runner(case, dims):
    """A no-argument callable that runs the row once and waits for its result."""
    import mindspore as ms

    from mcore import comm
    from mcore.moe import dispatcher as dispatchers
    from mcore.moe import experts as expert_classes
    from mcore.moe.config import MoEConfig
    from mcore.moe.groups import MoEGroups
    from mcore.moe.layer import MoELayer, MoESubmodules
    from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from mcore.transformer.mlp import MLP, MLPSubmodules

    row, mode, dispatcher, experts, ep, _ = case
    rng = np.random.default_rng(dims.world.rank)
    x = ms.Tensor(rng.standard_normal((B, S, H)).astype(np.float32))
    groups = MoEGroups.from_dims(dims) if ep == 2 else MoEGroups.single()
    if dispatcher is None:  # the dense reference
        mlp = MLP(_config(), MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                           linear_fc2=RowParallelLinear))
        fn = _value_and_grad(mlp, mode, moe=False)
        return lambda: fn(x)[0].asnumpy()
    d = getattr(dispatchers, dispatcher)(E, groups.ep)
    tokens = x.reshape(TOKENS, H)  # [b, s, h] -> [T, h]
    routing = ms.Tensor(np.stack([rng.permutation(E)[:K] for _ in range(TOKENS)]).astype(np.int32))
    if row == "counts_sync":
        counts = ms.Tensor(np.bincount(routing.asnumpy().reshape(-1), minlength=E)
                           .astype(np.float32).reshape(1, E))
        return lambda: comm.all_gather(counts, groups.ep, 0).asnumpy()
    if experts is None:  # exchange only: identity experts
        weights = ms.Tensor(np.full((TOKENS, K), 1.0 / K, np.float32))

        def exchange(t):
            x_local, _, handle = d.dispatch(t, routing)
            y = d.combine(x_local, weights, handle)
            return (y * y).mean()

        grad = ms.value_and_grad(exchange, grad_position=0)
        return lambda: grad(tokens)[1].asnumpy()
    moe = MoEConfig(num_experts=E, top_k=K, ffn_hidden_size=FFN, aux_loss_coeff=1e-2)
    layer = MoELayer(_config(), MoESubmodules(experts=getattr(expert_classes, experts),
                                              dispatcher=getattr(dispatchers, dispatcher)),
                     moe=moe, groups=groups)
    fn = _value_and_grad(layer, mode, moe=True)
    return lambda: fn(x)[0].asnumpy()


def _peer() -> None:
    """Rank 1: run the row rank 0 names, until STOP."""
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(ep=2)
    runners = [_runner(case, dims) for case in CASES]
    while (command := next_command(dims.world, 0.0)) != STOP:
        reference = CASES[int(command)][-1]
        if reference is not None:
            runners[reference]()
        runners[int(command)]()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    ms = pytest.importorskip("mindspore")
    ms.set_device("CPU")
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("bench_moe"))  # MindSpore writes rank_N/ into the cwd
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__)],
                              env=rank_env(2, port, role, rank))
             for role, rank in (("MS_SCHED", None), ("MS_WORKER", 1))]
    os.environ.update({k: v for k, v in rank_env(2, port, "MS_WORKER", 0).items()
                       if k.startswith("MS_")})
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(ep=2)
    yield dims, [_runner(case, dims) for case in CASES]
    next_command(dims.world, STOP)
    procs[1].wait(timeout=60)  # the scheduler exits once this process (rank 0) exits
    os.chdir(here)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_moe_layer_fwd_bwd_2_ranks(benchmark, job, index):
    dims, runners = job
    row, mode, _, _, _, reference = CASES[index]
    reference_seconds = []

    def setup():  # untimed: name the row to rank 1, then both run the reference row
        next_command(dims.world, float(index))
        if reference is not None:
            start = time.perf_counter()
            runners[reference]()
            reference_seconds.append(time.perf_counter() - start)

    benchmark.pedantic(runners[index], setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
        return
    t = benchmark.stats.stats.min
    info = {"seconds": round(t, 4)}
    if not row.startswith(("exchange", "counts")):
        info["tokens_per_s"] = round(TOKENS / t, 1)
    if reference is not None:
        t_ref = min(reference_seconds[1:])  # [0]: the warm-up round's
        info["reference"] = IDS[reference]
        if row.startswith(("exchange", "counts")):
            info["share_of_reference"] = round(t / t_ref, 3)
        else:
            info["reference_tokens_per_s"] = round(TOKENS / t_ref, 1)
            info["vs_dense"] = round(t_ref / t, 3)
    benchmark.extra_info.update(info)
    print(f"\n{IDS[index]:>32}: {1e3 * t:8.1f} ms  " +
          "  ".join(f"{k} {v}" for k, v in info.items() if k != "seconds"))


if __name__ == "__main__":
    from mcore.distributed_env import init_if_needed

    init_if_needed()
    if os.environ.get("MS_ROLE") == "MS_WORKER":
        _peer()
