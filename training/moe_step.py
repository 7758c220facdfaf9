"""The pieces of ``TrainStep`` (and ``PipelineTrainStep``) that differ for a mixture-of-experts
model (``model.moe_layers`` non-empty): the loss includes the router losses, and each step's
routing statistics are kept for the logger.

- ``MoELossCell(model, loss_scale)``: ``(inputs, labels) -> (S * loss, lm_loss, aux [L, 3],
  counts [L, E], mtp [D])`` with ``loss = lm_loss + aux.sum() (+ mtp.loss_factor * mtp.mean())``
  (``GPTModel.loss_terms``; ``mtp``: the multi-token-prediction losses, one 0 without MTP);
- ``MoEForwardBackward``: like ``training.step.ForwardBackward`` (adds ``scale * dloss/dw``
  to the fp32 buffers) but differentiates the first output only (``value_and_grad`` with
  ``has_aux``, inside the compiled construct) and returns ``(lm_loss, aux, counts, mtp)``.
  ``TrainStep`` also uses these two for a dense model with multi-token prediction;
- ``MoEStats``: per step, the router losses (mean over micro-batches and dp) and the tokens
  per expert (summed over micro-batches and dp), turned into ``training.logger.moe_metrics``;
- ``bias_routers(model)`` / ``update_expert_biases``: aux-loss-free balancing. After each
  APPLIED optimizer step (a skipped one leaves the bias alone), every router with
  ``expert_bias`` on gets ``bias += rate * sign(mean(load) - load)`` where ``load`` [E] is its
  layer's row of the step's counts summed over micro-batches and the dp group. The dp group is
  the one that holds all different tokens of the global batch: ``dp = world / (tp cp pp)``. The
  tp ranks share their tokens and each router counts ALL of them (``MoELayer`` routes the
  tp-replicated tokens before splitting them over tp), so the counts are identical on the tp
  ranks and a sum over dp counts each token once; ep / etp ranks outside the tp group are dp
  ranks with their own tokens. cp is refused for MoE by ``training/pretrain.py``. The same all-reduce serves the log and the
  update. The bias is a ``requires_grad=False`` Parameter: not in the optimizer nor the
  gradient norm; ``TrainStep`` saves it with the model state.
- Pipeline parallelism (``training.pipeline_step.PipelineTrainStep``): each pipeline rank routes
  only through its own stages' MoE layers; ``StageLayers`` says which rows of the whole
  model's ``[L, E]`` counts they are, and ``MoEStats.finish(dp, stage)`` sums every rank's
  router losses, counts and assignments over the pp group first (each layer lives on exactly
  one stage), so every rank logs the whole model's statistics and moves the biases of its own
  layers from their rows (``stage_bias_routers``).

The loss a step reports (and the skip rule reads) is the language-model loss ``lm_loss``, so a
MoE run's curve compares with a dense one; the router losses are ``moe_aux_loss``. Expert
parameters carry ``param.expert`` and are reduced over edp by the shared gradient finaliser
(``mcore.distributed.finalize``).
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from mcore.comm.collectives import all_reduce
from mcore.moe.router import update_expert_bias
from mcore.parallel_state import ProcessGroup
from training.logger import moe_metrics


class MoELossCell(nn.Cell):
    """``(inputs [b, s] int32, labels [b, s] int32) -> (S * loss, lm_loss, aux, counts, mtp)``.
    Packed batches add ``position_ids``, ``segment_ids`` [b, s] and ``denom`` (fp32 []): the
    language-model and MTP losses are token-loss sums / ``denom`` (``GPTModel.loss_terms``,
    ``training.packed_loss``); the router losses are per micro-batch as without packing."""

    def __init__(self, model, loss_scale: float = 1.0):
        super().__init__()
        self.model, self.loss_scale = model, float(loss_scale)

    def construct(self, inputs, labels, position_ids=None, segment_ids=None, denom=None):
        loss, lm_loss, aux, counts, mtp = self.model.loss_terms(inputs, labels, position_ids,
                                                                segment_ids, denom)
        if self.loss_scale != 1.0:
            loss = loss * self.loss_scale
        return loss, lm_loss, aux, counts, mtp


class MoEForwardBackward(nn.Cell):
    """``construct(inputs, labels, scale, position_ids=None, segment_ids=None, denom=None) ->
    (lm_loss, aux [L, 3], counts [L, E], mtp [D])`` and ``acc += scale / S * d(S loss)/dw``."""

    def __init__(self, loss_cell: MoELossCell, params, acc):
        super().__init__()
        self.params, self.acc = params, acc
        self.unscale = 1.0 / loss_cell.loss_scale
        self.value_and_grad = ms.value_and_grad(loss_cell, None, params, has_aux=True)

    def construct(self, inputs, labels, scale, position_ids=None, segment_ids=None, denom=None):
        (_, lm_loss, aux, counts, mtp), grads = self.value_and_grad(inputs, labels, position_ids,
                                                                    segment_ids, denom)
        if self.unscale != 1.0:
            scale = scale * self.unscale
        for i in range(len(self.acc)):
            ops.assign_add(self.acc[i], grads[i] * scale)
        return lm_loss, aux, counts, mtp


class MoEStats:
    """Routing statistics of one optimizer step. ``add(aux, counts, routed)`` per micro-batch
    (numpy or tensors; ``routed``: the token-expert assignments it made on this rank, ``tokens *
    top_k * MoE layers``, of which the counts miss the ones dropped over capacity), then
    ``finish(dp_group, stage=None)`` -> ``(training.logger.moe_metrics of the step, counts [L, E]
    float32)``: the router losses averaged over micro-batches and dp, counts summed over both
    (eager all-reduces, to run on every rank); with a pipeline rank's ``StageLayers`` first
    summed over pp into the whole model's rows."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.aux, self.counts, self.micro, self.routed = 0.0, None, 0, 0.0

    def add(self, aux, counts, routed: float) -> None:
        aux = np.asarray(aux.asnumpy() if hasattr(aux, "asnumpy") else aux, np.float64)
        counts = np.asarray(counts.asnumpy() if hasattr(counts, "asnumpy") else counts, np.float64)
        self.aux += float(aux.sum())
        self.counts = counts if self.counts is None else self.counts + counts  # [L, E]
        self.micro += 1
        self.routed += float(routed)

    def finish(self, dp_group, stage: "StageLayers | None" = None) -> tuple[dict, np.ndarray]:
        """This step's ``(moe_metrics, counts)`` (see the class docstring); then ``reset``.
        ``stage``: this pipeline rank's rows of the whole model (the counts added are those of
        ``stage.local``); the statistics are first summed over ``stage.pp`` (a rank without MoE
        layers adds nothing and still takes part)."""
        if self.micro == 0 and stage is None:
            raise ValueError("MoEStats.finish: no micro-batch was added")
        aux = np.array([self.aux / max(self.micro, 1), self.routed], np.float32)
        counts = None if self.counts is None else self.counts.astype(np.float32)  # [L, E]
        if stage is not None:
            aux, counts = stage.gather(aux, counts)
        if dp_group.size > 1:
            aux = all_reduce(ms.Tensor(aux), dp_group).asnumpy()
            aux[0] /= dp_group.size
            counts = all_reduce(ms.Tensor(counts), dp_group).asnumpy()
        routed = float(aux[1])
        out = moe_metrics(float(aux[0]), counts, dropped=max(routed - float(counts.sum()), 0.0),
                          routed=routed)
        self.reset()
        return out, counts


@dataclass(frozen=True)
class StageLayers:
    """Where one pipeline rank's MoE layers sit in the whole model: ``local`` (global layer
    index of each row of the counts this rank adds, in order), ``model`` (every MoE layer of the
    model, ascending: the rows of the whole model's counts), ``num_experts``, and ``pp`` (the
    pipeline group, whose ranks hold the other layers)."""

    pp: object
    local: tuple
    model: tuple
    num_experts: int

    def gather(self, aux_routed: np.ndarray, counts) -> tuple[np.ndarray, np.ndarray]:
        """``([aux, routed] summed over pp, counts [len(model), E] of the whole model)`` from
        this rank's ``[aux, routed]`` and ``counts [len(local), E]`` (None: no MoE layer here);
        one all-reduce over ``pp`` (every rank of it must call)."""
        full = np.zeros((len(self.model), self.num_experts), np.float32)  # [L, E]
        for row, layer in enumerate(self.local):
            full[self.model.index(layer)] = counts[row]
        packed = np.concatenate([np.asarray(aux_routed, np.float32), full.reshape(-1)])
        if self.pp.size > 1:
            packed = all_reduce(ms.Tensor(packed), self.pp).asnumpy()
        return packed[:2], packed[2:].reshape(full.shape)  # [2 + L E] -> [2], [L, E]


def stage_bias_routers(models, model_layers: tuple) -> list:
    """``bias_routers`` of a pipeline rank's stage ``models`` with rows of the WHOLE model's
    counts (``model_layers``: every MoE layer of the model, ascending)."""
    return [(model_layers.index(m.moe_layers[row]), router)
            for m in models for row, router in bias_routers(m)]


def bias_routers(model) -> list:
    """``[(row, router)]``: the routers of ``model.moe_layers`` (row ``i`` of the counts is layer
    ``moe_layers[i]``; ``num_layers + d`` is MTP depth ``d``) whose ``expert_bias`` is on."""
    block = model.decoder
    first = block.layer_range.start  # (a stage may hold no layer)
    out = []
    for row, index in enumerate(model.moe_layers):
        if index >= model.config.num_layers:  # a MoE multi-token-prediction depth
            layer = model.mtp.layers[index - model.config.num_layers].layer
        else:
            layer = block.layers[index - first]
        router = layer.mlp.router
        if router.use_bias:
            out.append((row, router))
    return out


def update_expert_biases(routers, counts) -> None:
    """``update_expert_bias`` for each ``(row, router)`` of ``bias_routers`` with ``counts
    [L, E]`` already summed over the global batch (``MoEStats.finish``), hence the one-rank
    group here."""
    alone = ProcessGroup.single()
    for row, router in routers:
        update_expert_bias(router, ms.Tensor(counts[row], ms.float32), alone)
