"""Mixture of experts: routing (``config``, ``routing``, ``router``), expert MLPs
(``grouped_matmul``, ``experts``), token movement (``permute``, ``dispatcher``) and the layer
(``layer``, ``groups``). See docs/moe.md; ``TransformerLayer`` builds a ``MoELayer`` as its mlp
for the layers ``TransformerConfig.moe`` marks (``mcore.transformer.layer_specs``).

The names below are imported on first use: ``mcore.transformer.config`` imports
``mcore.moe.config`` while the MoE layers themselves build on ``mcore.transformer``, so this
package must not import its layers eagerly.
"""
from importlib import import_module

_WHERE = {
    "MoEConfig": "config", "TopKRouter": "router", "AUX_LOSS_NAMES": "router",
    "update_expert_bias": "router", "grouped_matmul": "grouped_matmul",
    "GroupedMLP": "experts", "SequentialMLP": "experts", "permute": "permute",
    "unpermute": "permute", "AllGatherDispatcher": "dispatcher",
    "AllToAllDispatcher": "dispatcher", "MoEGroups": "groups", "MoELayer": "layer",
    "MoESubmodules": "layer",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'mcore.moe' has no attribute {name!r}")
    return getattr(import_module(f"mcore.moe.{_WHERE[name]}"), name)
