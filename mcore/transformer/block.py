"""TransformerBlock: a stack of layers built from a layer spec, then the final norm.

``layer_spec`` is one ``ModuleSpec`` for every layer, or a list with one spec per layer
(heterogeneous stacks). Layers listed in ``config.precision.recompute_layers`` (or all, with
``"all"``) recompute their activations in the backward pass (``Cell.recompute``).
Shapes: ``[b, s, h] -> [b, s, h]``; rotary ``cos, sin`` and ``key_mask`` / ``cache`` are passed
to every layer unchanged.
"""
from __future__ import annotations

from mindspore import nn

from mcore.parallel_state import ProcessGroup
from mcore.transformer.config import TransformerConfig
from mcore.transformer.norm import norm_class
from mcore.transformer.spec import build_module


class TransformerBlock(nn.Cell):
    """``num_layers`` layers from ``layer_spec`` plus ``final_norm`` (None: the config's norm)."""

    def __init__(self, config: TransformerConfig, layer_spec, tp_group: ProcessGroup | None = None,
                 final_norm=None):
        super().__init__()
        n = config.num_layers
        specs = layer_spec if isinstance(layer_spec, (list, tuple)) else [layer_spec] * n
        if len(specs) != n:
            raise ValueError(f"layer_spec: got {len(specs)} specs for num_layers={n}")
        self.layers = nn.CellList([build_module(spec, config, layer_number=i, tp_group=tp_group)
                                   for i, spec in enumerate(specs)])
        recompute = config.precision.recompute_layers
        for i, layer in enumerate(self.layers):
            if recompute == "all" or i in recompute:
                layer.recompute()
        self.final_norm = build_module(final_norm or norm_class(config.norm), config.hidden_size,
                                       eps=config.norm_eps)

    def construct(self, x, cos, sin, key_mask=None, cache=None):
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask, cache)
        return self.final_norm(x)
