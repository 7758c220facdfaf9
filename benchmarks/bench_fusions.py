"""Fused CPU kernels (``mcore.fusions``) against their composed references, in one run.

Shapes of ``configs/tiny_llama_bench.yaml`` (batch 4, seq 256, hidden 512, 8 heads of 64 with
2 kv heads, ffn 1408, vocabulary 32000), float32; ``grouped_matmul``: the fc1 of 8 SwiGLU
experts of ffn 704 (half the dense one), top-2 of those 1024 tokens (2048 rows, unevenly
routed), against the composed form that compiles (counts as a Tensor). Each case times one compiled
(``mindspore.jit``) forward + backward of ``sum(op(x) * probe)`` with the kernel and with the
composed reference, alternating them round after round so that both see the same load; rounds
run for at least ``SECONDS``.

Reported per case: median kernel and reference times and ``ratio_to_reference`` = kernel
median / reference median (< 1: the kernel pays). The ratio is the value to gate on: it is in
``benchmark.extra_info["ratio_to_reference"]`` and, as a gated metric in the format of the
benchmark gate (``extra_info["gate"]["fusions.<case>"] = {"value": ratio, "better": "lower"}``,
read by ``benchmarks/gate.py``). The timed function itself is the kernel, so the benchmark's
own stats are the kernel's. Run::

    .venv/bin/python -m pytest benchmarks/bench_fusions.py --benchmark-enable -s
"""
from __future__ import annotations

import time

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
ms.set_device("CPU")

from mindspore import Tensor, nn, ops  # noqa: E402

from mcore.fusions.attention import CoreAttention  # noqa: E402
from mcore.fusions.registry import choice, fused_cell  # noqa: E402
from mcore.moe.grouped_matmul import grouped_matmul  # noqa: E402
from mcore.parallel_state import ProcessGroup  # noqa: E402
from mcore.tensor_parallel.cross_entropy import TokenCrossEntropy  # noqa: E402
from mcore.transformer.mlp import silu  # noqa: E402
from mcore.transformer.norm import RMSNorm  # noqa: E402
from mcore.transformer.rotary import ApplyRotary  # noqa: E402

B, S, H, HEADS, KV, D, FFN, VOCAB = 4, 256, 512, 8, 2, 64, 1408, 32000
EXPERTS = 8
SECONDS = 3.0


class ComposedSwiGLU(nn.Cell):
    def __init__(self, f: int):
        super().__init__()
        self.f = f

    def construct(self, y):
        gate, up = ops.split(y, self.f, -1)  # [b, s, 2f] -> 2 x [b, s, f]
        return silu(gate) * up


class AddNorm(nn.Cell):
    """``s + RMSNorm(s)`` with ``s = x + r`` through ``RMSNorm.add_and_norm`` (both outputs reach
    the probe): fused = the add_rms_norm kernel, else the composed add and norm."""

    def __init__(self, fused: bool):
        super().__init__()
        self.norm = RMSNorm(H, 1e-5, fused=fused, name="fused" if fused else "plain")
        if fused and not self.norm.fuse_residual_add():
            raise RuntimeError("no add_rms_norm kernel here")

    def construct(self, x, r):
        s, y = self.norm.add_and_norm(x, r)
        return s + y


class Grouped(nn.Cell):
    """``grouped_matmul(x, w, counts)`` with the counts fixed: fused = the kernel, else the
    composed static form."""

    def __init__(self, fused: bool, counts):
        super().__init__()
        self.kernel = fused_cell("grouped_matmul", True) if fused else None
        self.counts = counts

    def construct(self, x, w):
        if self.kernel is None:
            return grouped_matmul(x, w, self.counts)
        return self.kernel(x, w, self.counts)


def _grad_step(cell: nn.Cell, n_inputs: int):
    """A compiled ``inputs -> (loss, grads)`` of ``loss = sum(cell(*inputs) * probe)`` over all
    inputs. The loss is returned so that the forward always runs: a gradient alone would let
    the compiler drop the forward of an op whose backward does not read its output."""
    positions = tuple(range(n_inputs))

    def loss(*args):
        return ops.sum(cell(*args[:n_inputs]) * args[n_inputs])

    return ms.jit(ms.value_and_grad(loss, positions, weights=cell.trainable_params() or None))


def _case(name: str):
    """(kernel, reference, inputs, probe) of case ``name`` (built alone: the other cases' kernels
    may be off in this mode)."""
    rng = np.random.default_rng(0)
    counts = Tensor(np.bincount(rng.integers(0, EXPERTS, 2 * B * S), minlength=EXPERTS)
                    .astype(np.int32))

    def t(*shape):
        return Tensor(rng.standard_normal(shape, dtype=np.float32))

    cases = {
        "rms_norm": lambda: (RMSNorm(H, 1e-5, fused=True, name="k"),
                             RMSNorm(H, 1e-5, fused=False, name="r"), (t(B, S, H),), t(B, S, H)),
        "add_rms_norm": lambda: (AddNorm(True), AddNorm(False), (t(B, S, H), t(B, S, H)),
                                 t(B, S, H)),
        "swiglu": lambda: (fused_cell("swiglu", True), ComposedSwiGLU(FFN), (t(B, S, 2 * FFN),),
                           t(B, S, FFN)),
        "rotary_q": lambda: (ApplyRotary(fused=True), ApplyRotary(fused=False),
                             (t(B, HEADS, S, D), t(1, 1, S, D), t(1, 1, S, D)), t(B, HEADS, S, D)),
        "attention": lambda: (CoreAttention(HEADS, D ** -0.5),
                              CoreAttention(HEADS, D ** -0.5, use_fused=False),
                              (t(B, HEADS, S, D), t(B, KV, S, D), t(B, KV, S, D)),
                              t(B, HEADS, S, D)),
        "cross_entropy": lambda: (
            TokenCrossEntropy(ProcessGroup.single("tp"), fused=True),
            TokenCrossEntropy(ProcessGroup.single("tp"), fused=False),
            (t(B, S, VOCAB), Tensor(rng.integers(0, VOCAB, (B, S)).astype(np.int32))), t(B, S)),
        "grouped_matmul": lambda: (Grouped(True, counts), Grouped(False, counts),
                                   (t(2 * B * S, H), t(EXPERTS, H, FFN)), t(2 * B * S, FFN)),
    }
    return cases[name]()


def measure(kernel, reference, inputs, probe, seconds: float = SECONDS):
    """Median seconds of (kernel, reference) fwd+bwd, alternating, after one warm-up each."""
    steps = [_grad_step(kernel, len(inputs)), _grad_step(reference, len(inputs))]
    args = (*inputs, probe)
    for step in steps:
        _sync(step(*args))  # compile
    times = ([], [])
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times[0]) < 5:
        for which, step in enumerate(steps):
            t0 = time.perf_counter()
            _sync(step(*args))
            times[which].append(time.perf_counter() - t0)
    return float(np.median(times[0])), float(np.median(times[1]))


def _flat(grads):
    out = []
    for g in grads if isinstance(grads, tuple) else (grads,):
        out.extend(_flat(g) if isinstance(g, tuple) else [g])
    return out


def _sync(grads):
    for g in _flat(grads):
        g.asnumpy()


@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "swiglu", "rotary_q", "attention",
                                  "cross_entropy", "grouped_matmul"])
def test_fused_kernel(benchmark, name):
    if choice({"rotary_q": "rotary"}.get(name, name)) != "cpu_kernel":
        pytest.skip("no CPU kernel here (MSFORMERS_FUSIONS=composed, or no C++ compiler)")
    kernel, reference, inputs, probe = _case(name)
    kernel_s, reference_s = measure(kernel, reference, inputs, probe)
    step = _grad_step(kernel, len(inputs))
    benchmark.pedantic(lambda: _sync(step(*inputs, probe)), rounds=10, warmup_rounds=1,
                       iterations=1)
    ratio = kernel_s / reference_s
    benchmark.extra_info.update(kernel_ms=kernel_s * 1e3, reference_ms=reference_s * 1e3,
                                ratio_to_reference=ratio)
    # a gated metric (benchmarks/gate.py's record format): lower is better
    benchmark.extra_info.setdefault("gate", {})[f"fusions.{name}"] = {"value": ratio,
                                                                      "better": "lower"}
    print(f"\n{name:>9} fwd+bwd: kernel {kernel_s * 1e3:7.2f} ms | composed {reference_s * 1e3:7.2f} ms"
          f" | ratio {ratio:.2f}")
