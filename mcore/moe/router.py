"""TopKRouter: the gate of a mixture-of-experts layer, and the expert-bias update.

``router(x [b, s, h]) -> (weights [T, k] fp32, experts [T, k] int32, aux [3] fp32,
counts [E] fp32)`` with ``T = b * s`` tokens in sequence-major order:

- logits = x . W^T in fp32 (W: [E, h]); routing by ``mcore.moe.routing.topk_routing``;
- ``aux`` holds the coefficient-weighted auxiliary losses, in the order of ``AUX_LOSS_NAMES``
  (a loss whose coefficient is 0 is 0 and not computed). The caller adds ``aux.sum()`` to the
  training loss; nothing is stored on the module;
- ``counts``: pairs each expert receives after capacity dropping (the load used by
  ``update_expert_bias``).

Balancing losses are computed over this rank's tokens, from the selections before capacity
dropping, with the per-token probabilities of ``routing.aux_scores``.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops

from mcore.comm import all_reduce
from mcore.moe import routing
from mcore.moe.config import MoEConfig
from mcore.parallel_state import ProcessGroup
from mcore.tensor_parallel.random import init_master, name_seed

AUX_LOSS_NAMES = ("load_balancing", "seq_load_balancing", "z")


class TopKRouter(nn.Cell):
    """See the module docstring. ``seed``: seed of the gate weight (default: from ``name``),
    identical on every rank so that expert-parallel ranks route alike."""

    def __init__(self, hidden_size: int, cfg: MoEConfig, name: str = "router",
                 seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        seed = name_seed(f"{name}.weight") if seed is None else seed
        self.weight = Parameter(ms.Tensor(init_master((E, hidden_size), seed)), name="weight")
        self.use_bias = cfg.expert_bias
        self.expert_bias = Parameter(ms.Tensor(np.zeros(E, np.float32)), name="expert_bias",
                                     requires_grad=False)

    def logits(self, x):
        """``[b, s, h] -> [b*s, E]`` fp32 router logits."""
        tokens = x.reshape(-1, x.shape[-1]).astype(ms.float32)  # [b, s, h] -> [T, h]
        return ops.matmul(tokens, self.weight.transpose(1, 0))  # [T, E]

    def construct(self, x):
        cfg = self.cfg
        batch = x.shape[0]
        logits = self.logits(x)
        bias = self.expert_bias if self.use_bias else None
        weights, experts = routing.topk_routing(logits, cfg, bias)
        aux = self._aux_losses(logits, experts, batch)
        capacity = cfg.capacity(logits.shape[0])
        if capacity is not None:
            weights, experts = routing.apply_capacity(weights, experts, cfg.num_experts,
                                                      capacity, cfg.drop_policy)
        counts = routing.tokens_per_expert(experts, cfg.num_experts)
        return weights, experts, aux, counts

    def _aux_losses(self, logits, experts, batch: int):
        cfg = self.cfg
        zero = ops.zeros((), ms.float32)
        lb, seq, z = zero, zero, zero
        if cfg.aux_loss_coeff > 0 or cfg.seq_aux_loss_coeff > 0:
            probs = routing.aux_scores(logits, cfg.score_function)  # [T, E]
            onehot = routing.expert_one_hot(experts, cfg.num_experts)  # [T, k, E]
            if cfg.aux_loss_coeff > 0:
                lb = cfg.aux_loss_coeff * routing.switch_load_balancing_loss(
                    probs, onehot.sum((0, 1)), cfg.top_k)
            if cfg.seq_aux_loss_coeff > 0:
                T, k, E = onehot.shape
                per_seq = onehot.reshape(batch, T // batch, k, E).sum((1, 2))  # [B, E]
                seq = cfg.seq_aux_loss_coeff * routing.seq_load_balancing_loss(
                    probs, per_seq, cfg.top_k, batch)
        if cfg.z_loss_coeff > 0:
            z = cfg.z_loss_coeff * routing.z_loss(logits)
        return ops.stack([lb, seq, z])


def expert_bias_delta(counts, rate: float, group: ProcessGroup):
    """``rate * sign(mean_load - load)`` where ``load`` = ``counts [E]`` summed over ``group``
    (the ranks whose tokens share this router, e.g. data x expert parallel)."""
    load = all_reduce(counts.astype(ms.float32), group)
    return rate * ops.sign(load.mean() - load)


def update_expert_bias(router: TopKRouter, counts, group: ProcessGroup):
    """Aux-loss-free balancing step: ``router.expert_bias += expert_bias_delta(...)``.

    Call once per optimizer step with the counts accumulated over its micro-batches.
    Returns the delta that was added."""
    delta = expert_bias_delta(counts, router.cfg.bias_update_rate, group)
    ops.assign(router.expert_bias, router.expert_bias + delta)
    return delta
