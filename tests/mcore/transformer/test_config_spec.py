"""TransformerConfig validation (errors name the field) and ModuleSpec composition."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import nn, ops  # noqa: E402

from mcore.transformer.config import (AttentionConfig, MoEConfig, PrecisionConfig,  # noqa: E402
                                      RotaryConfig, TransformerConfig)
from mcore.transformer.layer_specs import gpt_layer_spec  # noqa: E402
from mcore.transformer.norm import LayerNorm, RMSNorm  # noqa: E402
from mcore.transformer.spec import IdentityOp, ModuleSpec, build_module  # noqa: E402

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64)


@pytest.mark.parametrize("changes, field", [
    (dict(num_layers=0), "num_layers"),
    (dict(num_query_groups=3), "num_query_groups"),
    (dict(hidden_size=30), "hidden_size"),
    (dict(activation="tanh"), "activation"),
    (dict(norm="batchnorm"), "norm"),
    (dict(rotary=RotaryConfig(fraction=0.3)), "rotary.fraction"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TransformerConfig(**{**SMALL, **changes})


@pytest.mark.parametrize("make, field", [
    (lambda: RotaryConfig(scaling="ntk"), "rotary.scaling"),
    (lambda: AttentionConfig(block_size=0), "attention.block_size"),
    (lambda: MoEConfig(num_experts=4, top_k=5, ffn_hidden_size=8), "moe.top_k"),
    (lambda: PrecisionConfig(params_dtype="float8"), "precision.params_dtype"),
])
def test_sub_config_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_defaults_and_derived_fields():
    cfg = TransformerConfig(**SMALL)
    assert cfg.num_query_groups == 4 and cfg.head_dim == 8 and cfg.rotary_dim == 8
    assert cfg.softmax_scale == pytest.approx(8 ** -0.5)
    with pytest.raises(ValueError, match="num_query_groups"):
        TransformerConfig(**SMALL, num_query_groups=2).check_tp(4)


class ScaledNorm(nn.Cell):
    """A custom norm a user might plug in: x * scale (no subclassing of mcore classes). A norm
    node is built as ``(hidden_size, eps=, dtype=)`` (dtype: ``config.params_dtype``)."""

    def __init__(self, hidden_size, eps=1e-6, dtype=None, scale=2.0):
        super().__init__()
        self.scale = scale

    def construct(self, x):
        return x * self.scale


def test_swapping_a_submodule_needs_no_subclass():
    cfg = TransformerConfig(**SMALL)
    spec = gpt_layer_spec(cfg)
    custom = spec.replace(submodules=dataclasses.replace(
        spec.submodules, input_norm=ModuleSpec(ScaledNorm, params={"scale": 3.0}),
        pre_mlp_norm=LayerNorm))
    layer = build_module(custom, cfg, layer_number=0)
    assert isinstance(layer.input_norm, ScaledNorm) and layer.input_norm.scale == 3.0
    assert isinstance(layer.pre_mlp_norm, LayerNorm)
    assert isinstance(layer.post_attn_norm, IdentityOp)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((1, 3, 32)), ms.float32)
    cos = ops.ones((1, 1, 3, 8), ms.float32)
    sin = ops.zeros((1, 1, 3, 8), ms.float32)
    assert layer(x, cos, sin).shape == (1, 3, 32)


def test_build_module_error_names_the_module():
    with pytest.raises(TypeError, match="RMSNorm"):
        build_module(ModuleSpec(RMSNorm, params={"no_such_arg": 1}))


def test_norms_match_numpy():
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    rms = RMSNorm(16, eps=1e-6)(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(rms, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6),
                               rtol=1e-5, atol=1e-6)
    ln = LayerNorm(16, eps=1e-5)(ms.Tensor(x)).asnumpy()
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gelu_tanh"])
def test_mlp_matches_numpy(activation):
    from math import erf

    from mcore.transformer.layer_specs import mlp_spec

    cfg = TransformerConfig(**{**SMALL, "activation": activation, "mlp_fc1_bias": True})
    mlp = build_module(mlp_spec(cfg), cfg)
    x = np.random.default_rng(2).standard_normal((2, 3, 32)).astype(np.float32)
    w1, b1 = mlp.linear_fc1.weight.asnumpy(), mlp.linear_fc1.bias.asnumpy()
    w2 = mlp.linear_fc2.weight.asnumpy()
    y = x @ w1.T + b1
    if activation == "swiglu":
        gate, up = np.split(y, 2, -1)
        y = gate / (1 + np.exp(-gate)) * up
    elif activation == "gelu":
        y = 0.5 * y * (1 + np.vectorize(erf)(y / np.sqrt(2)))
    else:
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    np.testing.assert_allclose(mlp(ms.Tensor(x)).asnumpy(), y @ w2.T, rtol=1e-4, atol=1e-5)
