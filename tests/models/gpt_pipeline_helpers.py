"""Shared pieces of the GPTModel pipeline tests (``test_gpt_pipeline``, ``test_gpt_stages``):
the tiny Llama config, data, the full-model reference trajectory and the expected local
(stage, tp shard) values of full tensors. Imports MindSpore lazily (workers import it too).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "llama"
HF = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=256, intermediate_size=128, num_hidden_layers=5, rms_norm_eps=1e-5,
          max_position_embeddings=64, tie_word_embeddings=False)
STEPS, M, MBS, SEQ, VOCAB = 3, 4, 2, 16, 256
CONFIGS = {  # tag: (tie, vpp, layers_per_stage)
    "1f1b": (False, 1, [3, 2]),
    "interleaved": (False, 2, [2, 1, 1, 1]),
    "tied": (True, 1, [3, 2]),
}
# 4 ranks (pp=2 x tp=2): the tied model only; it also has what the untied one would add
# (column-parallel layers are in every layer), plus the embedding-group sum per tp rank.
# Each extra configuration costs ~30-40 s of compilation on 4 ranks sharing 2 cores.
TP_CONFIGS = {"tp_tied": (True, 1, [3, 2])}


def hf_config(tie: bool) -> dict:
    return dict(HF, tie_word_embeddings=tie)


def rel(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def table(tie: bool) -> dict:
    from models.hf import family_of

    family = family_of(hf_config(tie))
    return family.weight_table(family.config_from_hf(hf_config(tie)), tie)


def batches(step: int):
    import mindspore as ms

    rng = np.random.default_rng(100 + step)
    ids = rng.integers(0, VOCAB, (M, MBS, SEQ)).astype(np.int32)
    labels = rng.integers(0, VOCAB, (M, MBS, SEQ)).astype(np.int32)
    return [(ms.Tensor(ids[i]), ms.Tensor(labels[i])) for i in range(M)]


def forward_step(data_iterator, chunk):
    return next(data_iterator)


class Array:
    """A numpy array that looks like a checkpoint ``LazyTensor`` (``load()``, ``shape``)."""

    def __init__(self, array):
        self.array, self.shape = array, array.shape

    def load(self):
        return self.array


def expected_local(model, hf_tensors: dict) -> dict:
    """What ``model`` (a stage, maybe a tp shard) holds of full values given as HF tensors:
    the same slicing as loading a checkpoint (fused q/k/v and gate/up sharded per part)."""
    from models.hf import stage_table
    from models.weights import split_dims, to_local

    shapes = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    group = model.tp_group
    return to_local(stage_table(model), {k: Array(v) for k, v in hf_tensors.items()}, shapes,
                    split_dims(model), group.size, group.rank)


def sgd(params, grads, lr=0.1):
    from mindspore import ops

    for p, g in zip(params, grads):
        ops.assign(p, p - lr * g)


@functools.cache
def reference(tie: bool) -> dict:
    """The full single-process model: initial weights, and per step loss and gradients (cached
    per process: do not modify the result)."""
    import mindspore as ms
    from mindspore import ops

    import models

    model = models.build_from_config(hf_config(tie))
    names = [n for n, _ in model.parameters_and_names()]
    params = [p for _, p in model.parameters_and_names()]
    out = {"init": {n: p.asnumpy().copy() for n, p in zip(names, params)}, "steps": []}

    def loss_fn(ids, labels):
        return model(ids, labels=labels).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    for step in range(STEPS):
        micro = batches(step)
        ids, labels = ops.cat([b[0] for b in micro]), ops.cat([b[1] for b in micro])
        loss, grads = grad_fn(ids, labels)
        out["steps"].append((float(loss.asnumpy()),
                             {n: g.asnumpy().copy() for n, g in zip(names, grads)}))
        sgd(params, grads)
    return out


