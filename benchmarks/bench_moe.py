"""MoELayer forward+backward throughput in one process (hidden 256, 8 experts of ffn 512,
top-2, 4 x 128 tokens), for each experts x dispatcher pairing, PyNative and (the static
all-gather path) ``mindspore.jit``.

Reference printed beside each: a dense SwiGLU MLP with the same active width
(``top_k * expert ffn`` = 1024) in the same mode, i.e. the cost of the expert math alone.

    .venv/bin/python -m pytest benchmarks/bench_moe.py --benchmark-enable -s
"""
from __future__ import annotations

import time

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
ms.set_device("CPU")

from mcore.moe import dispatcher as dispatchers  # noqa: E402
from mcore.moe import experts as expert_classes  # noqa: E402
from mcore.moe.config import MoEConfig  # noqa: E402
from mcore.moe.layer import MoELayer, MoESubmodules  # noqa: E402
from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from mcore.transformer.config import TransformerConfig  # noqa: E402
from mcore.transformer.mlp import MLP, MLPSubmodules  # noqa: E402

H, E, K, FFN, B, S = 256, 8, 2, 512, 4, 128
CONFIG = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4,
                           ffn_hidden_size=K * FFN)
CASES = [("GroupedMLP", "AllToAllDispatcher", "pynative"),
         ("GroupedMLP", "AllGatherDispatcher", "pynative"),
         ("GroupedMLP", "AllGatherDispatcher", "jit"),
         ("SequentialMLP", "AllToAllDispatcher", "pynative")]


def _x():
    return ms.Tensor(np.random.default_rng(0).standard_normal((B, S, H)).astype(np.float32))


def _step(cell, mode, moe: bool):
    def loss(x):
        out = cell(x)
        y = out[0] if moe else out
        return (y * y).mean() + (out[1].sum() if moe else 0.0)

    fn = ms.value_and_grad(loss, grad_position=None, weights=cell.trainable_params())
    return ms.jit(fn) if mode == "jit" else fn


def _time(fn, x, rounds=3):
    fn(x)  # warm up / compile
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        value, _ = fn(x)
        value.asnumpy()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture(scope="module")
def dense_reference():
    """Seconds per forward+backward of the dense MLP of the same active width, per mode."""
    mlp = MLP(CONFIG, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                    linear_fc2=RowParallelLinear))
    return {mode: _time(_step(mlp, mode, moe=False), _x()) for mode in ("pynative", "jit")}


@pytest.mark.parametrize("experts, dispatcher, mode", CASES)
def test_moe_layer_train_tokens_per_s(benchmark, dense_reference, experts, dispatcher, mode):
    moe = MoEConfig(num_experts=E, top_k=K, ffn_hidden_size=FFN, aux_loss_coeff=1e-2)
    layer = MoELayer(CONFIG, MoESubmodules(experts=getattr(expert_classes, experts),
                                           dispatcher=getattr(dispatchers, dispatcher)), moe=moe)
    fn, x = _step(layer, mode, moe=True), _x()
    fn(x)  # warm up / compile

    def run():
        return fn(x)[0].asnumpy()

    benchmark.pedantic(run, rounds=3, iterations=1)
    seconds = benchmark.stats.stats.min if benchmark.stats else _time(fn, x, rounds=1)
    dense = dense_reference[mode]
    benchmark.extra_info.update(tokens_per_s=B * S / seconds, dense_tokens_per_s=B * S / dense)
    print(f"\n{experts}+{dispatcher} [{mode}]: {B * S / seconds:.0f} tokens/s "
          f"(dense MLP of the same active width: {B * S / dense:.0f} tokens/s)")
