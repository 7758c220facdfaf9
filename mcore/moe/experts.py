"""Routed experts of one rank: ``GroupedMLP`` (stacked weights, grouped matmul) and
``SequentialMLP`` (a loop of the dense ``MLP``, the reference).

Both hold the local experts ``first_expert .. first_expert + num_local - 1`` of ``num_experts``
and map ``x_sorted [N, h]`` (rows grouped by local expert, see ``mcore.moe.permute``) and
``tokens_per_expert`` (``[num_local]`` ints or Tensor) to ``[N, h]``; rows past the counted
ones give zeros. Expert ``e``'s weights are drawn from a seed of its global index and layer,
so any expert-parallel layout holds the same experts and both classes start equal.

Activation as in ``mcore.transformer.mlp``: "swiglu" experts have ``fc1: h -> 2f`` with the
``[gate | up]`` halves; the others ``fc1: h -> f``. Expert biases are not implemented.

Expert tensor parallelism (``etp``, a ``ProcessGroup`` of size ``P``, rank ``r``): each expert's
fc1 is split by columns (gate and up separately: this rank's ``fc1`` is ``[gate_r | up_r]``,
``2f / P`` wide) and fc2 by rows (``f / P``); the output is then this rank's PARTIAL sum, to be
summed over etp by the caller (``mcore.moe.groups.ExpertRegion.exit``). ``shard_dims`` names
the etp split dim of each stacked weight (``fc1``: 2, ``fc2``: 1) like the tp layers do, so
gradient finalisation counts the shards once in the norm and loaders slice them.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops

from mcore.fusions.registry import fused_cell
from mcore.moe.grouped_matmul import counts_tensor, grouped_matmul
from mcore.parallel_state import ProcessGroup
from mcore.tensor_parallel.sharding import shard, shard_size
from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.tensor_parallel.random import init_master, name_seed
from mcore.transformer.config import TransformerConfig
from mcore.transformer.mlp import MLP, MLPSubmodules, activate, silu


def expert_weights(config: TransformerConfig, ffn: int, expert: int, layer_number: int):
    """Initial ``(fc1 [h, 2f or f], fc2 [f, h])`` float32 arrays of global expert ``expert``."""
    h = config.hidden_size
    width = 2 * ffn if config.activation == "swiglu" else ffn
    prefix = f"layers.{layer_number}.experts.{expert}"
    fc1 = init_master((width, h), name_seed(f"{prefix}.linear_fc1"))  # [out, in] like Linear
    fc2 = init_master((h, ffn), name_seed(f"{prefix}.linear_fc2"))
    return np.ascontiguousarray(fc1.T), np.ascontiguousarray(fc2.T)


def etp_shard(fc1: np.ndarray, fc2: np.ndarray, gated: bool, size: int, rank: int):
    """Rank ``rank`` of ``size``'s slices of one expert's ``fc1 [h, 2f|f]`` (gate and up
    halves split separately) and ``fc2 [f, h]``: ``([h, 2f/size | f/size], [f/size, h])``."""
    if size == 1:
        return fc1, fc2
    halves = np.split(fc1, 2, 1) if gated else [fc1]  # [h, 2f] -> 2 x [h, f]
    fc1 = np.concatenate([shard(part, size, rank, 1) for part in halves], 1)
    return fc1, shard(fc2, size, rank, 0)


def _local_ffn(ffn: int, etp: ProcessGroup | None) -> tuple[int, int, int]:
    """``(f / etp, etp size, etp rank)``; ``ValueError`` naming moe.ffn_hidden_size."""
    size, rank = (etp.size, etp.rank) if etp is not None else (1, 0)
    return shard_size(ffn, size, "moe.ffn_hidden_size over etp"), size, rank


def _check(config: TransformerConfig, num_experts: int, first_expert: int, num_local: int):
    if config.mlp_fc1_bias or config.mlp_fc2_bias:
        raise ValueError("mlp_fc1_bias / mlp_fc2_bias: MoE experts have no biases yet")
    if not (num_local > 0 and 0 <= first_expert and first_expert + num_local <= num_experts):
        raise ValueError(f"local experts [{first_expert}, {first_expert + num_local}) are not "
                         f"inside [0, {num_experts})")


class GroupedMLP(nn.Cell):
    """Local experts as two stacked weights: ``fc1 [El, h, 2f/etp|f/etp]``,
    ``fc2 [El, f/etp, h]``. Float32 products go through the fused ops "grouped_matmul" and
    "swiglu" of ``mcore.fusions`` where the registry has them (``fused``: None = the registry
    decides, False = the composed ``grouped_matmul`` and ``silu(gate) * up``)."""

    shard_dims = {"fc1": 2, "fc2": 1}  # split over etp (see the module docstring)

    def __init__(self, config: TransformerConfig, ffn_hidden_size: int, num_experts: int,
                 first_expert: int = 0, num_local: int | None = None, layer_number: int = 0,
                 etp: ProcessGroup | None = None, fused: bool | None = None):
        super().__init__()
        num_local = num_experts if num_local is None else num_local
        _check(config, num_experts, first_expert, num_local)
        self.activation = config.activation
        self.ffn, size, rank = _local_ffn(ffn_hidden_size, etp)
        gated = config.activation == "swiglu"
        pairs = [etp_shard(*expert_weights(config, ffn_hidden_size, e, layer_number), gated,
                           size, rank)
                 for e in range(first_expert, first_expert + num_local)]
        dtype = getattr(ms, config.precision.params_dtype)
        self.fc1 = Parameter(ms.Tensor(np.stack([p[0] for p in pairs]), dtype), name="fc1")
        self.fc2 = Parameter(ms.Tensor(np.stack([p[1] for p in pairs]), dtype), name="fc2")
        for p in (self.fc1, self.fc2):
            p.expert = True  # for gradient finalisation: reduced over edp, not dp
        self.kernel = fused_cell("grouped_matmul", fused)
        self.use_kernel = self.kernel is not None and dtype == ms.float32
        swiglu = fused_cell("swiglu", fused) if gated else None
        self.use_swiglu = swiglu is not None
        if self.use_swiglu:
            self.swiglu = swiglu

    def _activate(self, y):
        if self.use_swiglu and y.dtype == ms.float32:
            return self.swiglu(y)  # [N, 2f/etp] -> [N, f/etp]
        if self.activation == "swiglu":
            gate, up = ops.split(y, self.ffn, -1)  # [N, 2f/etp] -> 2 x [N, f/etp]
            return silu(gate) * up
        return activate(y, self.activation)

    def construct(self, x, tokens_per_expert):
        # [N, h] -> [N, 2f/etp] or [N, f/etp] -> [N, f/etp] -> [N, h] (this rank's partial sum)
        if self.use_kernel and x.dtype == ms.float32:
            counts = counts_tensor(tokens_per_expert, self.fc1.shape[0], x.shape[0])
            y = self._activate(self.kernel(x, self.fc1, counts))
            return self.kernel(y, self.fc2, counts)
        y = self._activate(grouped_matmul(x, self.fc1, tokens_per_expert))
        return grouped_matmul(y, self.fc2, tokens_per_expert)


class SequentialMLP(nn.Cell):
    """Local experts as a list of dense ``MLP``s run one after the other (eager only); with
    etp each ``MLP`` is this rank's ``f / etp`` slice (no communication inside it)."""

    def __init__(self, config: TransformerConfig, ffn_hidden_size: int, num_experts: int,
                 first_expert: int = 0, num_local: int | None = None, layer_number: int = 0,
                 etp: ProcessGroup | None = None):
        super().__init__()
        num_local = num_experts if num_local is None else num_local
        _check(config, num_experts, first_expert, num_local)
        local_ffn, size, rank = _local_ffn(ffn_hidden_size, etp)
        gated = config.activation == "swiglu"
        spec = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        self.local_experts = nn.CellList()
        for e in range(first_expert, first_expert + num_local):
            mlp = MLP(config, spec, ffn_hidden_size=local_ffn, layer_number=layer_number)
            fc1, fc2 = etp_shard(*expert_weights(config, ffn_hidden_size, e, layer_number),
                                 gated, size, rank)
            mlp.linear_fc1.weight.set_data(ms.Tensor(fc1.T.copy(), mlp.linear_fc1.weight.dtype))
            mlp.linear_fc2.weight.set_data(ms.Tensor(fc2.T.copy(), mlp.linear_fc2.weight.dtype))
            for p in mlp.get_parameters():
                p.expert = True
            self.local_experts.append(mlp)

    def construct(self, x, tokens_per_expert):
        if not isinstance(tokens_per_expert, (list, tuple)):
            tokens_per_expert = tokens_per_expert.asnumpy().astype(int).tolist()
        pieces, start = [], 0
        for mlp, n in zip(self.local_experts, tokens_per_expert):
            if n:
                pieces.append(mlp(x[start:start + n]))  # [n, h] -> [n, h]
            start += n
        if start < x.shape[0]:
            pieces.append(ops.zeros((x.shape[0] - start, x.shape[1]), x.dtype))
        return ops.cat(pieces, axis=0) if len(pieces) > 1 else pieces[0]
