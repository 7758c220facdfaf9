"""Mixture of experts: routing (``config``, ``routing``, ``router``), expert MLPs
(``grouped_matmul``, ``experts``), token movement (``permute``, ``dispatcher``) and the layer
(``layer``, ``groups``). See docs/moe.md. Not yet wired into ``TransformerLayer`` /
``GPTModel`` / the training loop."""
from mcore.moe.config import MoEConfig
from mcore.moe.dispatcher import AllGatherDispatcher, AllToAllDispatcher
from mcore.moe.experts import GroupedMLP, SequentialMLP
from mcore.moe.grouped_matmul import grouped_matmul
from mcore.moe.groups import MoEGroups
from mcore.moe.layer import MoELayer, MoESubmodules
from mcore.moe.permute import permute, unpermute
from mcore.moe.router import AUX_LOSS_NAMES, TopKRouter, update_expert_bias

__all__ = [
    "MoEConfig", "TopKRouter", "AUX_LOSS_NAMES", "update_expert_bias", "grouped_matmul",
    "GroupedMLP", "SequentialMLP", "permute", "unpermute", "AllGatherDispatcher",
    "AllToAllDispatcher", "MoEGroups", "MoELayer", "MoESubmodules",
]
