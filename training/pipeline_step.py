"""The training step with pipeline parallelism (``parallel.pp > 1``), same contract as ``TrainStep``.

    pipeline = models.gpt_pipeline.build_gpt_pipeline(hf_cfg, dims, vpp, layers_per_stage)
    step = PipelineTrainStep(pipeline, dims, cfg.optimizer, grad_accum_steps, seq_length,
                             micro_batch_size)
    loss, grad_norm = step(micro_batches, lr)     # micro_batches: [(inputs, labels), ...]

One optimizer step on each pipeline rank:

1. ``get_forward_backward_func(pp, vpp)`` (1F1B, or interleaved 1F1B when vpp > 1) runs the
   ``n`` micro-batches through this rank's compiled stage chunks; it returns the loss (mean over
   micro-batches, the same on every pp rank) and, per chunk, the gradients of that mean loss.
2. A tied embedding's two copies (first stage's embedding, last stage's head:
   ``param.shared_embedding``) get their gradients summed over the embedding group
   (``mcore.distributed.finalize.sum_tied_grads``, eagerly, so both apply the same update).
3. The gradients go into fp32 buffers and ``AdamWUpdate`` (one compiled graph; with
   ``optimizer.distributed`` the ZeRO-1 ``DistributedAdamW``, per stage over its dp group)
   does the rest,
   as for ``TrainStep``, through the same ``GradFinalizer``: dp (experts: edp) mean; the global
   norm sums squares over tp (split parameters), over the stages (one pp all-reduce) and counts
   the tied weight once (the head copy is left out); clip; AdamW. Skipping a non-finite step and counting AdamW's steps is ``TrainState``'s
   (``apply_update``), shared with ``TrainStep``.

Packed fine-tuning batches (``(inputs, labels, position_ids, segment_ids)`` 4-tuples,
``training.packed_loss``): every stage gets each micro-batch's positions and segment ids (its
attention ``key_mask``); the last stage's loss is the token-loss sum / ``N / (n D)`` (``N`` the
kept tokens of the global batch, counted on the host on every rank), so the loss and gradients
are those of ``TrainStep``'s: the mean over the kept tokens of the whole global batch. MoE
stages route every position of a packed row (their router losses and counts as without
packing).

Mixture of experts (the model has MoE layers): stages holding MoE layers add their router
losses' gradients in their own backward (``models.gpt_pipeline``), so the gradients are those
of ``lm_loss + aux.sum()`` as in ``TrainStep``; the step reports the language-model loss. Per
step, each rank's ``(aux, counts)`` of its own layers go through ``training.moe_step.MoEStats``
with its ``StageLayers``: summed over pp and dp, so ``last_moe_metrics`` / ``last_moe_counts``
describe the whole model on every rank, and an applied step moves the expert biases of this
rank's routers from their rows (``TrainState.finish_moe``). The biases are saved with the
stage's model state (``buffers``).

Parameter names are the full model's (``decoder.layers.<global index>...``), so per-stage
checkpoints hold disjoint name sets and merge into the full model by union.
fp16: stage matmuls in fp16 (``apply_compute_dtype`` on each chunk), static loss scale ``S``
applied by the schedule (``PipelineModel.loss_scale``), gradients unscaled before the update.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, ops

from mcore.comm.collectives import all_reduce
from mcore.distributed.finalize import grad_plans, sum_tied_grads
from mcore.parallel_state import ParallelDims
from mcore.pipeline_parallel.schedules import get_forward_backward_func
from training.adamw import compile_update
from training.optim import should_decay
from training.packed_loss import dp_sum, kept_tokens, packed_denominator
from training.step import TrainState, apply_compute_dtype, build_update, tp_split_names


def _names(pipeline) -> list[list[str]]:
    """Per chunk, the full-model name of each of its runner's parameters (in ``params`` order)."""
    out = []
    for runner, model in zip(pipeline.chunks, pipeline.chunk_models):
        by_id = {id(p): n for n, p in model.parameters_and_names()}
        missing = [p.name for p in runner.params if id(p) not in by_id]
        if missing:
            raise ValueError(f"pipeline chunk parameters {missing} are not in its chunk model")
        out.append([by_id[id(p)] for p in runner.params])
    return out


class PipelineTrainStep(TrainState):
    """Pipeline schedule + dp all-reduce + clipping + AdamW; see the module docstring."""

    def __init__(self, pipeline, dims: ParallelDims, opt_cfg, grad_accum_steps: int,
                 seq_length: int, micro_batch_size: int, dtype: str = "fp32",
                 loss_scale: float = 1.0):
        self.pipeline, self.dims, self.opt = pipeline, dims, opt_cfg
        self.n_micro, self.seq, self.mbs = int(grad_accum_steps), int(seq_length), int(micro_batch_size)
        self.loss_scale = float(loss_scale)
        pipeline.loss_scale = self.loss_scale
        self.schedule = get_forward_backward_func(dims.pp.size, len(pipeline.chunks))
        self.cast_cells = [c for m in pipeline.chunk_models for c in apply_compute_dtype(m, dtype)]
        names = _names(pipeline)
        self.named, split = [], set()
        for runner, model, chunk_names in zip(pipeline.chunks, pipeline.chunk_models, names):
            chunk_split = tp_split_names(model)
            for name, p in zip(chunk_names, runner.params):
                self.named.append((name, p))
                if name in chunk_split:
                    split.add(name)
        if len({n for n, _ in self.named}) != len(self.named):
            raise ValueError("pipeline chunks share parameter names: build each chunk's layers "
                             "with their global layer numbers")
        self.params = ParameterTuple([p for _, p in self.named])
        self.acc = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"grad_acc.{p.name}",
                                             requires_grad=False) for p in self.params])
        decay = [should_decay(n, len(p.shape)) for n, p in self.named]
        self.plans = grad_plans(self.named, split, dims)
        self.update = build_update(self.params, self.acc, decay, self.plans, dims, opt_cfg)
        self._jit_update = compile_update(self.update)
        self._init_moe(pipeline.chunk_models)

    def _init_moe(self, models) -> None:
        """MoE bookkeeping (see the module docstring); nothing for a dense model."""
        config = models[0].config
        self.moe_layers = tuple(i for i in range(config.num_layers) if config.is_moe_layer(i))
        if not self.moe_layers:
            return
        from training.moe_step import MoEStats, StageLayers, stage_bias_routers

        self.moe_top_k = config.moe.top_k
        local = tuple(i for m in models for i in m.moe_layers)  # rows of ScheduleResult.aux
        self.moe_stats = MoEStats()
        self.moe_stage = StageLayers(self.dims.pp, local, self.moe_layers, config.moe.num_experts)
        self.bias_routers = stage_bias_routers(models, self.moe_layers)
        ids = {id(r.expert_bias) for _, r in self.bias_routers}
        self.buffers = tuple((n, p) for m in models for n, p in m.parameters_and_names()
                             if id(p) in ids)

    def _add_moe(self, chunk_aux, tokens: int) -> None:
        """Add each micro-batch's ``(aux, counts)`` of this rank's MoE chunks to ``moe_stats``
        (rows in ``moe_stage.local`` order: chunk by chunk)."""
        chunk_aux = [pairs for pairs in chunk_aux if pairs]
        n_local = len(self.moe_stage.local)
        for micro in range(self.n_micro if chunk_aux else 0):
            pairs = [pairs[micro] for pairs in chunk_aux]
            aux = sum(float(a.asnumpy().sum()) for a, _ in pairs)
            counts = np.concatenate([c.asnumpy() for _, c in pairs])  # chunks -> [L_local, E]
            self.moe_stats.add(np.array([aux]), counts, tokens * self.moe_top_k * n_local)

    def _update(self, *args):  # the schedule runs in PyNative: compile the update explicitly
        return self._jit_update(*args)

    def _run(self, batches, forward_only: bool, denom=None):
        """The schedule over ``batches``; packed 4-tuples give every stage their positions and
        segment ids and the loss ``denom`` (fp32 [])."""
        data = iter([(ms.Tensor(b[0], ms.int32), ms.Tensor(b[1], ms.int32)) for b in batches])
        stage_inputs = None
        if denom is not None:
            stage_inputs = [(ms.Tensor(b[2], ms.int32), ms.Tensor(b[3], ms.int32), denom)
                            for b in batches]
        return self.schedule(_next_batch, data, self.pipeline, num_microbatches=len(batches),
                             seq_length=self.seq, micro_batch_size=self.mbs,
                             forward_only=forward_only, stage_inputs=stage_inputs)

    def __call__(self, micro_batches, lr: float) -> tuple[float, float]:
        """One optimizer step. ``micro_batches``: ``n`` (inputs, labels) numpy int32 pairs (only
        the first and last stage read them), or packed 4-tuples (every stage reads them; see
        the module docstring). Returns ``(loss, grad_norm)``: loss averaged over
        micro-batches and dp, the same on every rank; non-finite: the update was skipped."""
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"got {len(micro_batches)} micro-batches, expected grad_accum_steps="
                             f"{self.n_micro}")
        denom = None
        if len(micro_batches[0]) == 4:  # packed: mean over the global batch's kept tokens
            denom = packed_denominator(micro_batches, self.dims.dp)
        result = self._run(micro_batches, forward_only=False, denom=denom)
        grads = sum_tied_grads([g for chunk in result.grads for g in chunk], self.plans, self.dims)
        unscale = 1.0 / self.loss_scale
        for acc, g in zip(self.acc, grads):
            ops.assign(acc, g.astype(ms.float32) * unscale if unscale != 1.0 else g)
        if self.moe_layers:
            self._add_moe(result.aux, self.mbs * self.seq)
        applied_before = self.adam_steps
        out = self.apply_update(lr, result.loss)
        if self.moe_layers:
            self.finish_moe(self.adam_steps > applied_before)
        return out

    def evaluate(self, batches) -> float:
        """Mean loss over ``batches`` (forward only through the pipeline), then over dp; packed
        4-tuples: the mean over all their kept tokens on every dp rank."""
        if batches and len(batches[0]) == 4:
            one = ms.Tensor(1.0, ms.float32)  # loss_fn: sum of token losses
            total = self._run(batches, forward_only=True, denom=one).loss * len(batches)
            total, count = dp_sum([total, kept_tokens(batches)], self.dims.dp)
            return float(total / max(count, 1.0))
        loss = np.array(self._run(batches, forward_only=True).loss, np.float32)
        if self.dims.dp.size > 1:
            loss = all_reduce(ms.Tensor(loss), self.dims.dp).asnumpy() / self.dims.dp.size
        return float(loss)


def _next_batch(data_iterator, chunk):
    """``forward_step_func`` of the schedules: the next ``(inputs, labels)`` micro-batch."""
    return next(data_iterator)
