"""MoELayer: router -> dispatch -> experts -> combine, plus optional shared experts.

    weights, experts, aux, counts = router(x)                 # x [b, s, h]
    y = combine(experts_module(dispatch(x, experts)), weights)
    y = y + shared(x) [* sigmoid(x . w_gate)]                  # when a shared expert is set

``MoELayer(x) -> (y [b, s, h], aux [3], counts [E])``: always these three. ``aux`` holds the
coefficient-weighted router losses (``router.AUX_LOSS_NAMES``); the caller adds ``aux.sum()``
to its loss. ``counts`` is the number of (kept) pairs this rank routed to each expert, the
input of ``router.update_expert_bias``. Nothing is kept on the module between calls.

Built like the dense MLP from a ``ModuleSpec`` (the mlp node of a layer spec, see
``mcore.transformer.layer_specs.moe_mlp_spec``)::

    ModuleSpec(MoELayer, submodules=MoESubmodules(experts=GroupedMLP,
                                                  dispatcher=AllToAllDispatcher))

with the arguments ``TransformerLayer`` passes its mlp (``config``, ``groups=`` a
``ModelGroups``, ``layer_number=``); ``moe`` defaults to ``config.moe``. ``returns_aux = True``
tells ``TransformerLayer`` that this mlp returns ``(y, aux, counts)``. Parallelism
(``mcore.moe.groups``): the router runs on all ``T = b * s`` tokens of the tp-replicated input
(so its gradient, ``aux`` and ``counts`` are the same on every tp rank and need no tp sync);
``ExpertRegion`` gives each tp rank its 1/tp of the tokens, all-gathered over ``groups.etp``;
``groups.ep`` splits the experts (the dispatcher moves tokens over it); each expert's weights
are split over ``groups.etp`` (``GroupedMLP``); the partial outputs are reduce-scattered over
etp and all-gathered over tp. The shared expert is a tensor-parallel ``MLP`` over ``groups.tp``.
``moe.ffn_hidden_size`` must be divisible by etp (``T`` need not be by tp: see
``ExpertRegion``). With ``groups.ep`` of size one every dispatcher is ``AllGatherDispatcher``
(then a local permutation with no communication, the same numbers, and it compiles: the
all-to-all one plans on the host and runs eagerly only), so a model built from a Hugging Face
directory decodes and serves compiled at any tp. Expert weights are created in ``config.params_dtype`` and carry
``param.expert = True``; the router weight stays float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mindspore as ms
from mindspore import Parameter, nn, ops

from mcore.moe.config import MoEConfig
from mcore.moe.dispatcher import AllGatherDispatcher, AllToAllDispatcher
from mcore.moe.experts import GroupedMLP
from mcore.moe.groups import ExpertRegion, check_supported
from mcore.moe.permute import pad_to_capacity, unpad_from_capacity
from mcore.moe.router import TopKRouter
from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.tensor_parallel.random import init_master, name_seed
from mcore.transformer.config import TransformerConfig
from mcore.transformer.mlp import MLP, MLPSubmodules
from mcore.transformer.spec import ModuleSpec, build_module


def _shared_spec():
    return ModuleSpec(MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                    linear_fc2=RowParallelLinear))


@dataclass
class MoESubmodules:
    """What to build: the routed ``experts`` (``GroupedMLP`` or ``SequentialMLP``), the token
    ``dispatcher`` (``AllToAllDispatcher`` or ``AllGatherDispatcher``) and the shared expert
    (an ``MLP`` spec; built only when ``moe.shared_ffn_hidden_size`` > 0)."""

    experts: object = GroupedMLP
    dispatcher: object = AllToAllDispatcher
    shared_experts: object = field(default_factory=_shared_spec)


class MoELayer(nn.Cell):
    """See the module docstring."""

    returns_aux = True

    def __init__(self, config: TransformerConfig, submodules: MoESubmodules,
                 moe: MoEConfig | None = None, groups: ModelGroups | None = None,
                 layer_number: int = 0):
        super().__init__()
        groups = groups or ModelGroups()
        check_supported(groups)
        moe = config.moe if moe is None else moe
        if moe.num_experts <= 0:
            raise ValueError(f"moe.num_experts={moe.num_experts}: must be > 0 for MoELayer")
        if moe.ffn_hidden_size <= 0:
            raise ValueError(f"moe.ffn_hidden_size={moe.ffn_hidden_size}: must be > 0 for MoELayer")
        h, E = config.hidden_size, moe.num_experts
        self.moe = moe
        self.ep_size = groups.ep.size
        if config.parallel.sequence_parallel and groups.tp.size > 1:
            raise NotImplementedError("MoELayer: sequence_parallel with tp > 1 is not supported")
        self.router = TopKRouter(h, moe, name=f"layers.{layer_number}.router")
        self.region = ExpertRegion(groups, E)
        dispatcher = submodules.dispatcher if groups.ep.size > 1 else AllGatherDispatcher
        self.dispatcher = build_module(dispatcher, E, groups.ep)
        num_local = E // groups.ep.size
        self.experts = build_module(submodules.experts, config, ffn_hidden_size=moe.ffn_hidden_size,
                                    num_experts=E, first_expert=groups.ep.rank * num_local,
                                    num_local=num_local, layer_number=layer_number,
                                    etp=groups.etp)
        self.num_local = num_local
        self.has_shared = moe.shared_ffn_hidden_size > 0
        self.has_gate = self.has_shared and moe.shared_expert_gate
        if self.has_shared:
            self.shared_experts = build_module(submodules.shared_experts, config,
                                               groups=ModelGroups(tp=groups.tp),
                                               ffn_hidden_size=moe.shared_ffn_hidden_size,
                                               layer_number=layer_number)
        if self.has_gate:
            seed = name_seed(f"layers.{layer_number}.shared_expert_gate")
            self.shared_gate = Parameter(ms.Tensor(init_master((h, 1), seed), config.params_dtype),
                                         name="shared_gate")

    def _routed(self, tokens, weights, experts, capacity):
        x_local, counts, handle = self.dispatcher.dispatch(tokens, experts)  # [n, h]
        if self.moe.pad_to_capacity:
            # the router kept <= capacity pairs per expert of its T tokens; a dispatch source
            # holds gather_factor such token slices, and ep sources send to each expert
            slots = self.ep_size * self.region.gather_factor * capacity
            counts_t = counts if isinstance(counts, ms.Tensor) else ms.Tensor(counts, ms.int32)
            padded = pad_to_capacity(x_local, counts_t, slots)  # [El * slots, h]
            full = ops.fill(ms.int32, (self.num_local,), slots)
            full = full if isinstance(counts, ms.Tensor) else [slots] * self.num_local
            y_padded = self.experts(padded, full)
            y_local = unpad_from_capacity(y_padded, counts_t, slots, x_local.shape[0])
        else:
            y_local = self.experts(x_local, counts)
        return self.dispatcher.combine(y_local, weights, handle)  # [T, h]

    def construct(self, x):
        b, s, h = x.shape
        weights, experts, aux, counts = self.router(x)  # all T tokens, on every tp rank
        tokens = x.reshape(b * s, h)  # [b, s, h] -> [T, h]
        # [T, .] -> [T / tp * etp, .]: own tp slice, gathered over etp
        tokens, weights, experts = self.region.enter(tokens, weights, experts)
        y = self._routed(tokens, weights, experts, self.moe.capacity(b * s))
        y = self.region.exit(y, b * s).reshape(b, s, h)  # [T / tp * etp, h] -> [T, h] -> [b, s, h]
        if self.has_shared:
            shared = self.shared_experts(x)  # [b, s, h]
            if self.has_gate:
                shared = shared * ops.sigmoid(ops.matmul(x, self.shared_gate.astype(x.dtype)))
            y = y + shared
        return y, aux, counts
