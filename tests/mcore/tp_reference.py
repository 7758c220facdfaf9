"""Shared pieces for the tensor-parallel tests: numpy references and tiny models.

Imports MindSpore lazily (the numpy parts are used by plain single-process tests too).
"""
from __future__ import annotations

import numpy as np


def data(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def assert_close(got, ref, what: str = "", rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` relative to the largest reference magnitude (partial sums add in
    another order across ranks, so element-wise relative error is meaningless near zero)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-30)
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol} * {scale:.3g}"


def cross_entropy_ref(logits, labels, ignore_index=-100, label_smoothing=0.0):
    """(per-token loss [b, s], dloss_sum/dlogits [b, s, V]) in float64 numpy."""
    z = logits.astype(np.float64)
    V = z.shape[-1]
    m = z.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(-1))
    logp = z - lse[..., None]
    valid = labels != ignore_index
    safe = np.where(valid, labels, 0)
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    loss = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    q = np.eye(V)[safe] * (1 - label_smoothing) + label_smoothing / V
    grad = (np.exp(logp) - q) * valid[..., None]
    return np.where(valid, loss, 0.0), grad


def build_mlp(h: int, f: int, group, sequence_parallel: bool = False, variant: str = "plain"):
    """Column(h -> f) -> gelu -> Row(f -> h). ``variant="gather"``: the column layer gathers
    its output and the row layer splits its input (exercises the other two mappings)."""
    from mindspore import nn, ops

    from mcore.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    gather = variant == "gather"

    class MLP(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fc1 = ColumnParallelLinear(h, f, group, gather_output=gather,
                                            sequence_parallel=sequence_parallel, name="fc1")
            self.fc2 = RowParallelLinear(f, h, group, input_is_parallel=not gather,
                                         sequence_parallel=sequence_parallel, name="fc2")

        def construct(self, x):
            return self.fc2(ops.gelu(self.fc1(x)))

    return MLP()


def set_biases(mlp, group) -> None:
    """Give both biases non-zero values (the same full vectors for any tp size)."""
    import mindspore as ms

    from mcore.tensor_parallel import shard

    f, h = mlp.fc1.output_size, mlp.fc2.output_size
    mlp.fc1.bias.set_data(ms.Tensor(shard(data((f,), 77), group.size, group.rank, 0)))
    mlp.fc2.bias.set_data(ms.Tensor(data((h,), 78)))


def loss_and_grads(net, inputs, weight, mode: str):
    """(output, d input, {param name: grad}) of ``sum(net(*inputs) * weight)`` in ``mode``."""
    import mindspore as ms
    from mindspore import nn

    from tests.ms_helpers import compiler

    class Objective(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net

        def construct(self, x, w):
            out = self.net(x)
            return (out * w).sum(), out

    named = [(n, p) for n, p in net.parameters_and_names() if p.requires_grad]
    obj = Objective()
    params = [p for _, p in named]
    fn = ms.value_and_grad(obj, grad_position=0, weights=params, has_aux=True)
    (_, out), (dx, dws) = compiler(mode)(fn)(ms.Tensor(inputs), ms.Tensor(weight))
    names = [n for n, _ in named]
    return out.asnumpy(), dx.asnumpy(), {n: g.asnumpy() for n, g in zip(names, dws)}
