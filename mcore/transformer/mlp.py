"""Feed-forward block: ``fc2(act(fc1(x)))``, gated (SwiGLU) or not, tensor parallel over ffn.

Gated: ``linear_fc1`` projects ``h -> 2 f`` and its local weight on rank r is ``[gate_r; up_r]``
(rows ``f / tp`` each; loaders shard gate and up separately); the output is
``fc2(silu(gate) * up)`` ("swiglu") or ``fc2(gelu_tanh(gate) * up)`` ("geglu", T5 v1.1).
Ungated (gelu, gelu_tanh, relu, silu): ``fc1: h -> f``.
``linear_fc1`` is column-parallel, ``linear_fc2`` row-parallel over ``groups.tp``
(``ModelGroups``; None = single process); parameters in ``config.params_dtype``.
``[b, s, h] -> [b, s, h]``.

Gated float32 activations go through the fused "swiglu" op of ``mcore.fusions`` when the
registry has one for the device (``fused``: None = the registry decides, False = composed).
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import nn, ops

from mcore.fusions.registry import fused_cell
from mcore.parallel_state import ModelGroups
from mcore.transformer.config import TransformerConfig
from mcore.transformer.spec import build_module


@dataclass
class MLPSubmodules:
    linear_fc1: object
    linear_fc2: object


def silu(x):
    return x * ops.sigmoid(x)


def activate(x, kind: str):
    """An ungated activation by ``TransformerConfig.activation`` name: "gelu" (erf), "gelu_tanh"
    (tanh approximation), "relu" or "silu" (also any other name)."""
    if kind == "gelu":
        return ops.gelu(x, approximate="none")
    if kind == "gelu_tanh":
        return ops.gelu(x, approximate="tanh")
    if kind == "relu":
        return ops.relu(x)
    return silu(x)


class MLP(nn.Cell):
    """See the module docstring. ``ffn_hidden_size`` overrides the config's (MoE experts);
    ``layer_number`` names the linear layers (and so seeds their initialisation)."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules,
                 groups: ModelGroups | None = None, ffn_hidden_size: int | None = None,
                 layer_number: int = 0, fused: bool | None = None):
        super().__init__()
        tp_group = (groups or ModelGroups()).tp
        ffn = ffn_hidden_size or config.ffn_hidden_size
        self.activation = config.activation
        self.gated = config.activation in ("swiglu", "geglu")
        self.local_ffn = ffn // tp_group.size
        sp = config.parallel.sequence_parallel
        self.linear_fc1 = build_module(submodules.linear_fc1, config.hidden_size,
                                       2 * ffn if self.gated else ffn, tp_group=tp_group,
                                       bias=config.mlp_fc1_bias, gather_output=False,
                                       sequence_parallel=sp,
                                       partitions=(ffn, ffn) if self.gated else None,
                                       name=f"layers.{layer_number}.linear_fc1",
                                       params_dtype=config.params_dtype)
        self.linear_fc2 = build_module(submodules.linear_fc2, ffn, config.hidden_size,
                                       tp_group=tp_group, bias=config.mlp_fc2_bias,
                                       input_is_parallel=True, sequence_parallel=sp,
                                       name=f"layers.{layer_number}.linear_fc2",
                                       params_dtype=config.params_dtype)
        kernel = fused_cell("swiglu", fused) if config.activation == "swiglu" else None
        self.use_kernel = kernel is not None
        if self.use_kernel:
            self.swiglu = kernel

    def _act(self, x):
        return activate(x, self.activation)

    def construct(self, x):
        y = self.linear_fc1(x)  # [b, s, h] -> [b, s, 2f/tp] (gated) or [b, s, f/tp]
        if self.use_kernel and y.dtype == ms.float32:
            y = self.swiglu(y)  # [b, s, 2f/tp] -> [b, s, f/tp]
        elif self.gated:
            gate, up = ops.split(y, self.local_ffn, -1)  # [b, s, 2f/tp] -> 2 x [b, s, f/tp]
            y = (ops.gelu(gate, approximate="tanh") if self.activation == "geglu"
                 else silu(gate)) * up
        else:
            y = self._act(y)
        return self.linear_fc2(y)  # [b, s, f/tp] -> [b, s, h]
