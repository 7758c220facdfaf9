"""Parameter names of standalone layers: ``<name>.weight`` / ``<name>.bias``, so layers with
distinct names share one MindSpore optimizer; inside a model the names stay attribute paths."""
from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import nn

ms.set_device("CPU")

from mcore.parallel_state import ParallelDims  # noqa: E402
from mcore.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,  # noqa: E402
                                   VocabParallelEmbedding)
from mcore.transformer.norm import LayerNorm, RMSNorm  # noqa: E402


def _layers():
    tp = ParallelDims.build().tp
    return {
        "emb": VocabParallelEmbedding(11, 8, tp, name="emb"),
        "norm1": RMSNorm(8, name="norm1"),
        "fc1": ColumnParallelLinear(8, 16, tp, name="fc1"),
        "fc2": RowParallelLinear(16, 8, tp, name="fc2"),
        "fc3": ColumnParallelLinear(8, 8, tp, name="fc3"),  # a second layer of the same kind
        "norm2": LayerNorm(8, name="norm2"),
    }


def test_standalone_layers_have_distinct_names():
    layers = _layers()
    names = [p.name for layer in layers.values() for p in layer.trainable_params()]
    assert names == ["emb.weight", "norm1.weight", "fc1.weight", "fc1.bias", "fc2.weight",
                     "fc2.bias", "fc3.weight", "fc3.bias", "norm2.weight", "norm2.bias"]


def test_one_adam_over_standalone_layers_steps_and_changes_every_parameter():
    layers = _layers()
    params = [p for layer in layers.values() for p in layer.trainable_params()]
    opt = nn.Adam(params, learning_rate=0.01)
    before = {p.name: p.asnumpy().copy() for p in params}

    def loss_fn(ids):  # the layers in order, standalone: no parent Cell renames them
        x = ids
        for layer in layers.values():
            x = layer(x)
        return (x * x).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)
    ids = ms.Tensor(np.array([[1, 2, 3], [4, 5, 10]], np.int32))
    loss, grads = grad_fn(ids)
    opt(grads)
    assert np.isfinite(float(loss.asnumpy()))
    unchanged = [p.name for p in params if np.array_equal(p.asnumpy(), before[p.name])]
    assert unchanged == [], unchanged
    assert [p.name for p in params] == list(before), "the optimizer step renamed parameters"


def test_names_inside_a_model_are_attribute_paths():
    import models
    from tests.models import gpt_pipeline_helpers as H

    model = models.build_from_config(H.hf_config(True))
    pairs = list(model.parameters_and_names())
    assert pairs and all(p.name == path for path, p in pairs), \
        [(path, p.name) for path, p in pairs if p.name != path]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in dict(pairs)
