"""A tiny stack model for pipeline tests and benchmarks (imports MindSpore: use in workers).

``token ids [B, S] -> Embed -> num_layers x Block (x + tanh(W x + b)) -> Head -> logits
[B, S, V] -> mean cross-entropy``. Weights come from a numpy seed, so every rank builds the
same model; ``make_cells`` returns fresh Cells each call (one copy for the pipeline, one for
the single-process reference). ``param_keys`` names every parameter ``"<cell>.<param>"`` by
cell index in the full model, to reassemble gradients across ranks.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


class Embed(nn.Cell):
    def __init__(self, table):
        super().__init__()
        self.weight = Parameter(Tensor(table), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)  # [B, S] -> [B, S, H]


class Block(nn.Cell):
    def __init__(self, w, b):
        super().__init__()
        self.weight = Parameter(Tensor(w), name="weight")  # [H, H]
        self.bias = Parameter(Tensor(b), name="bias")      # [H]

    def construct(self, x):
        return x + ops.tanh(ops.matmul(x, self.weight) + self.bias)  # [B, S, H]


class Head(nn.Cell):
    def __init__(self, w):
        super().__init__()
        self.weight = Parameter(Tensor(w), name="weight")  # [H, V]

    def construct(self, x):
        return ops.matmul(x, self.weight)  # [B, S, H] -> [B, S, V]


class CrossEntropy(nn.Cell):
    def construct(self, logits, labels):
        v = logits.shape[-1]
        return ops.cross_entropy(logits.reshape(-1, v), labels.reshape(-1))


class Full(nn.Cell):
    """The whole model with its loss, for the single-process reference."""

    def __init__(self, cells, loss):
        super().__init__()
        self.cells_ = nn.CellList(cells)
        self.loss = loss

    def construct(self, ids, labels):
        x = ids
        for cell in self.cells_:
            x = cell(x)
        return self.loss(x, labels)


def make_cells(num_layers=6, hidden=16, vocab=32, seed=0, scale=0.3):
    """``(embed, [blocks], head)`` with deterministic weights (block / head std ``scale``)."""
    rng = np.random.default_rng(seed)

    def arr(*shape, std=scale):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    embed = Embed(arr(vocab, hidden, std=1.0))
    blocks = [Block(arr(hidden, hidden), arr(hidden, std=0.1)) for _ in range(num_layers)]
    return embed, blocks, Head(arr(hidden, vocab))


def param_keys(embed, blocks, head) -> dict:
    """id(Parameter) -> "<cell index>.<param index>" over the full model."""
    keys = {}
    for i, cell in enumerate([embed, *blocks, head]):
        for j, p in enumerate(cell.trainable_params()):
            keys[id(p)] = f"{i}.{j}"
    return keys


def batches(step, m, mbs, seq, vocab=32, seed=0):
    """``m`` micro-batches ``(ids [mbs, seq], labels [mbs, seq])`` of training step ``step``."""
    rng = np.random.default_rng(1000 + 100 * seed + step)
    ids = rng.integers(0, vocab, (m, mbs, seq)).astype(np.int32)
    labels = rng.integers(0, vocab, (m, mbs, seq)).astype(np.int32)
    return [(Tensor(ids[i]), Tensor(labels[i])) for i in range(m)]


def forward_step(data_iterator, chunk):
    """``forward_step_func`` for the schedules: the next ``(ids, labels)``."""
    return next(data_iterator)


def reference_step(full, keys, micro_batches):
    """Loss (mean over micro-batches) and ``{key: grad}`` of the full model, one process."""
    ids = ops.cat([b[0] for b in micro_batches])        # [m * mbs, S]
    labels = ops.cat([b[1] for b in micro_batches])
    params = full.trainable_params()
    loss, grads = ms.value_and_grad(full, grad_position=None, weights=params)(ids, labels)
    return float(loss.asnumpy()), {keys[id(p)]: g.asnumpy() for p, g in zip(params, grads)}


def sgd(params, grads, lr=0.1):
    """``p -= lr * g`` in place. (``Parameter.set_data`` / ``assign_value`` are NOT seen by
    already-compiled jit graphs on MindSpore 2.10; ``ops.assign`` is.)"""
    for p, g in zip(params, grads):
        ops.assign(p, p - lr * g)


class TPBlock(nn.Cell):
    """``x + fc2(tanh(fc1(x)))`` with fc1 column- and fc2 row-parallel over ``tp_group``; the
    weights are shards of the master weights drawn from the names, so a tp=2 block equals
    the tp=1 block (``ProcessGroup.single()``) at step 0."""

    def __init__(self, hidden, ffn, tp_group, name):
        super().__init__()
        from mcore.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from mcore.tensor_parallel.random import init_normal

        self.fc1 = ColumnParallelLinear(hidden, ffn, tp_group, init_method=init_normal(0.3),
                                        name=f"{name}.fc1")
        self.fc2 = RowParallelLinear(ffn, hidden, tp_group, init_method=init_normal(0.3),
                                     name=f"{name}.fc2")

    def construct(self, x):
        return x + self.fc2(ops.tanh(self.fc1(x)))  # [b, s, h] -> [b, s, ffn/tp] -> [b, s, h]


def make_tp_cells(tp_group, num_layers=4, hidden=16, ffn=32, vocab=32, seed=0):
    """``(embed, [TPBlock], head)``; embed / head replicated, as in ``make_cells``."""
    embed, _, head = make_cells(0, hidden, vocab, seed)
    return embed, [TPBlock(hidden, ffn, tp_group, f"block{i}") for i in range(num_layers)], head


def tp_split_dims(blocks) -> dict:
    """id(Parameter) -> the dim it is split on over tp (``None``: replicated)."""
    dims = {}
    for block in blocks:
        for layer in (block.fc1, block.fc2):
            for name, dim in layer.shard_dims.items():
                param = getattr(layer, name, None)
                if param is not None:
                    dims[id(param)] = dim
    return dims
