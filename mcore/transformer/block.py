"""TransformerBlock: a stack of layers built from a layer spec, then the final norm.

``layer_spec`` is one ``ModuleSpec`` for every layer, or a list with one spec per layer
(heterogeneous stacks, indexed by global layer number). Layers listed in
``config.precision.recompute_layers`` (or all, with ``"all"``) recompute their activations in
the backward pass (``Cell.recompute``).

Pipeline stages: ``layer_range`` (a ``range`` of GLOBAL layer indices, default all
``config.num_layers``; may be empty) builds only those layers, each with its global
``layer_number``, so its weights (seeded by name), KV-cache slot and parameter names
(``layers.<global i>.*``) are those of the same layer in the full stack. ``post_process=False``
drops the final norm (a stage that is not the last one).
Shapes: ``[b, s, h] -> [b, s, h]`` (``[b, s/tp, h]`` with
``config.parallel.sequence_parallel``, the final norm then flagged ``param.sequence_parallel``);
rotary ``cos, sin`` and ``key_mask`` / ``cache`` are passed to every layer unchanged; ``groups``
(a ``ModelGroups``) to every layer's constructor.

Mixture of experts (``config.moe``): ``moe_layers`` lists the global indices of this block's MoE
layers (``TransformerLayer.is_moe``). ``forward_with_aux(x, cos, sin, key_mask, cache) ->
(x [b, s, h], aux [L, 3], counts [L, E])`` returns, besides the output, each MoE layer's
coefficient-weighted router losses (columns ``mcore.moe.AUX_LOSS_NAMES``) and its per-expert
token counts, row ``i`` for layer ``moe_layers[i]``. A block without MoE layers returns one row
of zeros (``L = 1``, ``E`` = max(num_experts, 1); counts are float32 like the router's; zero-size tensors are unreliable in PyNative on
CPU), so the sum is right either way. ``construct`` returns only ``x``.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from mcore.parallel_state import ModelGroups
from mcore.transformer.config import TransformerConfig
from mcore.transformer.norm import mark_sequence_parallel, norm_class
from mcore.transformer.spec import build_module


def check_layer_range(layer_range, num_layers: int, what: str = "layer_range") -> range:
    """``layer_range`` (None: all layers) as a step-1 ``range`` inside ``[0, num_layers)``, or a
    ``ValueError`` naming the values."""
    if layer_range is None:
        return range(num_layers)
    if not isinstance(layer_range, range):
        raise ValueError(f"{what}={layer_range!r}: must be a range of global layer indices "
                         f"(e.g. range(2, 4))")
    if layer_range.step != 1:
        raise ValueError(f"{what}={layer_range!r}: step must be 1, got {layer_range.step}")
    if len(layer_range) and (layer_range.start < 0 or layer_range.stop > num_layers):
        raise ValueError(f"{what}={layer_range!r}: must lie within range(0, {num_layers}) "
                         f"(num_layers={num_layers})")
    return layer_range


class LayerList(nn.CellList):
    """A ``CellList`` whose children are registered under their GLOBAL layer numbers, so
    ``parameters_and_names()`` yields ``<global i>.*`` on every pipeline stage. Iteration and
    ``layers[k]`` are by local position (``layers[0]`` is the stage's first layer);
    ``numbers`` lists the global index of each. Works in PyNative and under ``mindspore.jit``."""

    def __init__(self, cells, numbers):
        super().__init__()
        self.numbers = tuple(numbers)
        for number, cell in zip(self.numbers, cells):
            self.insert_child_to_cell(str(number), cell)

    def __getitem__(self, index):
        return list(self._cells.values())[index]


class TransformerBlock(nn.Cell):
    """Layers ``layer_range`` (default all) from ``layer_spec`` plus ``final_norm`` (None: the
    config's norm; built only with ``post_process``)."""

    def __init__(self, config: TransformerConfig, layer_spec, groups: ModelGroups | None = None,
                 final_norm=None, layer_range: range | None = None, post_process: bool = True):
        super().__init__()
        n = config.num_layers
        specs = layer_spec if isinstance(layer_spec, (list, tuple)) else [layer_spec] * n
        if len(specs) != n:
            raise ValueError(f"layer_spec: got {len(specs)} specs for num_layers={n}")
        self.layer_range = check_layer_range(layer_range, n)
        self.layers = LayerList([build_module(specs[i], config, layer_number=i, groups=groups)
                                 for i in self.layer_range], self.layer_range)
        self.moe_layers = tuple(i for i, layer in zip(self.layer_range, self.layers)
                                if getattr(layer, "is_moe", False))
        for i, layer in zip(self.layer_range, self.layers):
            if config.is_moe_layer(i) != getattr(layer, "is_moe", False):
                raise ValueError(f"layer_spec: layer {i} must {'' if config.is_moe_layer(i) else 'not '}"
                                 f"have a MoE mlp per config.moe (use gpt_layer_specs / "
                                 f"moe_layer_specs for a MoE config)")
        self.num_experts = max(config.moe.num_experts, 1)
        recompute = config.precision.recompute_layers
        for i, layer in zip(self.layer_range, self.layers):
            if recompute == "all" or i in recompute:
                if i in self.moe_layers:
                    layer.recompute_parts()
                else:
                    layer.recompute()
        self.post_process = post_process
        self.final_norm = None
        if post_process:
            self.final_norm = build_module(final_norm or norm_class(config.norm),
                                           config.hidden_size, eps=config.norm_eps,
                                           dtype=config.params_dtype)
            if config.parallel.sequence_parallel:
                mark_sequence_parallel(self.final_norm)

    def construct(self, x, cos, sin, key_mask=None, cache=None):
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask, cache)
        if self.post_process:
            x = self.final_norm(x)
        return x

    def forward_with_aux(self, x, cos, sin, key_mask=None, cache=None):
        """``-> (x [b, s, h], aux [L, 3], counts [L, E])``; see the module docstring."""
        auxes, counts = (), ()
        for layer in self.layers:
            if layer.is_moe:
                x, aux, count = layer.forward_with_aux(x, cos, sin, key_mask, cache)
                auxes += (aux,)
                counts += (count,)
            else:
                x = layer(x, cos, sin, key_mask, cache)
        if self.post_process:
            x = self.final_norm(x)
        if not auxes:
            return x, ops.zeros((1, 3), ms.float32), ops.zeros((1, self.num_experts), ms.float32)
        return x, ops.stack(auxes), ops.stack(counts)  # L x [3] -> [L, 3]; L x [E] -> [L, E]
