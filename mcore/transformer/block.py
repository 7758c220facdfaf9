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
Shapes: ``[b, s, h] -> [b, s, h]``; rotary ``cos, sin`` and ``key_mask`` / ``cache`` are passed
to every layer unchanged.
"""
from __future__ import annotations

from mindspore import nn

from mcore.parallel_state import ProcessGroup
from mcore.transformer.config import TransformerConfig
from mcore.transformer.norm import norm_class
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

    def __init__(self, config: TransformerConfig, layer_spec, tp_group: ProcessGroup | None = None,
                 final_norm=None, layer_range: range | None = None, post_process: bool = True):
        super().__init__()
        n = config.num_layers
        specs = layer_spec if isinstance(layer_spec, (list, tuple)) else [layer_spec] * n
        if len(specs) != n:
            raise ValueError(f"layer_spec: got {len(specs)} specs for num_layers={n}")
        self.layer_range = check_layer_range(layer_range, n)
        self.layers = LayerList([build_module(specs[i], config, layer_number=i, tp_group=tp_group)
                                 for i in self.layer_range], self.layer_range)
        recompute = config.precision.recompute_layers
        for i, layer in zip(self.layer_range, self.layers):
            if recompute == "all" or i in recompute:
                layer.recompute()
        self.post_process = post_process
        self.final_norm = None
        if post_process:
            self.final_norm = build_module(final_norm or norm_class(config.norm),
                                           config.hidden_size, eps=config.norm_eps)

    def construct(self, x, cos, sin, key_mask=None, cache=None):
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask, cache)
        if self.post_process:
            x = self.final_norm(x)
        return x
