"""The compiled training step: forward + backward per micro-batch, then one AdamW update.

    step = TrainStep(model, dims, cfg.optimizer, grad_accum_steps)
    loss, grad_norm = step(micro_batches, lr)     # micro_batches: [(inputs, labels), ...]

One optimizer step, for ``n`` micro-batches on each of ``D`` data-parallel ranks:

1. ``ForwardBackward`` (one compiled graph, run ``n`` times): ``loss_k = mean over tokens of
   model(inputs, labels=labels)`` and ``acc += d(loss_k / n)/dw`` into fp32 buffers. With
   context parallelism (``dims.cp`` > 1) each micro-batch is first cut to this rank's ``s / cp``
   tokens and their positions (``training.context_parallel.cp_micro_batch``).
2. ``AdamWUpdate`` (``training/adamw.py``: small compiled graphs, AdamW by an in-place kernel,
   ``mcore.fusions``' ``adamw`` or MindSpore's, which needs no per-parameter temporaries):
   - ``g, norm = GradFinalizer(acc)`` (``mcore.distributed.finalize``, driven by what each
     parameter carries): ``g = all_reduce_sum(acc, dp_cp) / D`` with ``D = dp x cp`` (the
     gradient of the mean loss over the global batch; expert parameters: summed over edp, ``/ D``); the global norm counts
     every parameter once (tp-split shards' squares summed over tp, experts' over ep,
     replicated ones as they are). ``g *= min(1, clip / (norm + 1e-6))`` when ``clip > 0``.
   - AdamW, for update ``t`` (1-based), decoupled decay (the ``should_decay`` mask)::

         m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
         w = w - lr wd w                (only where decay applies)
         w = w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

   - ``acc = 0``.

   With ``optimizer.distributed`` (ZeRO-1, ``build_update``) step 2 is
   ``mcore.distributed.distributed_optimizer.DistributedAdamW``: the same math on this rank's
   shard of the moments, gradients reduce-scattered and weights all-gathered over dp.

Skipped steps, in every precision: when the loss or the global gradient norm is not finite (an
fp16 overflow, or an fp32 run that diverges), the update leaves weights and moments unchanged
and ``t`` (``TrainState.adam_steps``, the count of applied updates, saved with checkpoints) does
not advance; the gradient buffers are still zeroed. ``TrainState.apply_update`` holds this
bookkeeping for ``TrainStep`` and ``PipelineTrainStep``; ``skipped_in_a_row`` counts
consecutive skips (the loop stops the run after ``training.max_skipped_steps``).

Compute dtype (``training.dtype``, ``apply_compute_dtype``): parameters are always fp32 and are
the master weights; AdamW runs on them in fp32. With ``fp16`` every tensor-parallel linear layer
(q/k/v, attention output, MLP, output head) runs its matmul in fp16 (``Cell.to_float``: its input
and weight are cast on the way in); the residual stream, norms, attention scores and softmax,
the logits (cast back to fp32 by a forward hook on the head) and the cross-entropy stay fp32.
fp16 uses a static loss scale ``S`` (``training.loss_scale``, default 1024): backward runs on
``S * loss`` and ``acc += d(S loss_k)/dw * (1 / (n S))``, so the gradients are unscaled before
the dp all-reduce and the clipping; an overflowing step is skipped as above (its norm, inf or
nan, is returned). bf16 has no compute kernels on CPU (``training/run_checks.py:check_supported``
refuses it there).
``mode``: ``set_mode("graph")`` compiles every Cell call (GRAPH_MODE, 3-5x faster than PyNative
on CPU, first compile ~5-15 s); ``"pynative"`` runs eagerly for debugging. Same numbers either way
to fp32 rounding. ``training/adamw.py`` folds AdamW's bias correction into its kernel's scalars.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, nn, ops

from mcore.comm.collectives import all_reduce
from mcore.distributed.finalize import grad_plans
from mcore.fusions.registry import fused_cell
from mcore.parallel_state import ParallelDims
from training.adamw import AdamWUpdate
from training.logger import mtp_metrics
from training.optim import should_decay
from training.context_parallel import cp_micro_batch
from training.packed_loss import packed_denominator, packed_mean_loss


def set_mode(mode: str) -> None:
    """``training.mode``: ``"graph"`` (compile) or ``"pynative"`` (eager)."""
    if mode not in ("graph", "pynative"):
        raise ValueError(f"training.mode={mode!r}: expected 'graph' or 'pynative'")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)


COMPUTE_DTYPES = {"fp32": ms.float32, "float32": ms.float32, "fp16": ms.float16,
                  "float16": ms.float16, "bf16": ms.bfloat16, "bfloat16": ms.bfloat16}


def _logits_to_fp32(cell, inputs, output):
    """Forward hook on the output head: fp32 logits for the softmax / cross-entropy."""
    return output.astype(ms.float32)


def apply_compute_dtype(model, dtype: str) -> list[str]:
    """Run the matmuls of every tensor-parallel linear layer of ``model`` in ``dtype`` (in place;
    parameters stay fp32) and keep the head's logits fp32. Returns the names of the cells cast
    (empty for fp32). See the module docstring for what stays fp32."""
    from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"training.dtype={dtype!r}: expected one of fp32, fp16, bf16")
    target = COMPUTE_DTYPES[dtype]
    if target == ms.float32:
        return []
    cast = []
    for name, cell in model.cells_and_names():
        if isinstance(cell, (ColumnParallelLinear, RowParallelLinear)):
            cell.to_float(target)
            cast.append(name)
    head = getattr(model, "output_layer", None)
    if head is not None:
        head.register_forward_hook(_logits_to_fp32)
    return cast


def tp_split_names(model) -> set[str]:
    """Names of parameters split over the tp group (from each Cell's ``shard_dims``)."""
    out = set()
    for cell_name, cell in model.cells_and_names():
        for pname, dim in getattr(cell, "shard_dims", {}).items():
            if dim is not None:
                out.add(f"{cell_name}.{pname}" if cell_name else pname)
    return out


class LossCell(nn.Cell):
    """(inputs [b, s] int32, labels [b, s] int32) -> mean token cross-entropy (scalar); with
    context parallelism ``position_ids [b, s/cp]`` give the positions of the rank's tokens. Packed
    batches add ``position_ids``, ``segment_ids`` (the model's ``key_mask``) [b, s] and
    ``denom`` (fp32 []): the sum of the token losses / ``denom`` (``training.packed_loss``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, inputs, labels, position_ids=None, segment_ids=None, denom=None):
        if denom is None:  # position_ids: None, or a cp rank's positions (training.context_parallel)
            return self.model(inputs, position_ids, None, labels).mean()  # [b, s] -> []
        return self.model(inputs, position_ids, segment_ids, labels).sum() / denom  # -> []


def mean_loss(loss_cell: LossCell, batches, dp_group, cp_group=None) -> float:
    """Forward only: mean of ``loss_cell`` over ``batches`` ((inputs, labels) numpy pairs, the
    same count on every dp rank), averaged over ``dp_group`` (every rank gets the result);
    packed 4-tuples: ``training.packed_loss.packed_mean_loss``. ``cp_group`` of size > 1: each
    sequence is split over it (``training.context_parallel``) and ``dp_group`` must be the
    dp x cp group."""
    if batches and len(batches[0]) == 4:
        return packed_mean_loss(loss_cell, batches, dp_group)
    total = 0.0
    for batch in batches:
        if cp_group is not None and cp_group.size > 1:
            inputs, labels, pos = (ms.Tensor(x, ms.int32) for x in cp_micro_batch(batch, cp_group))
            total += float(loss_cell(inputs, labels, pos).asnumpy())
            continue
        inputs, labels = batch
        total += float(loss_cell(ms.Tensor(inputs, ms.int32), ms.Tensor(labels, ms.int32)).asnumpy())
    mean = np.array(total / max(len(batches), 1), np.float32)
    if dp_group.size > 1:
        mean = all_reduce(ms.Tensor(mean), dp_group).asnumpy() / dp_group.size
    return float(mean)


class ForwardBackward(nn.Cell):
    """Returns the micro-batch loss and adds ``scale * dloss/dw`` to the ``acc`` buffers.

    The backward starts from the sensitivity ``scale`` (``loss_scale * scale`` with a loss
    scale), so its gradients arrive scaled and are added in place: no per-parameter multiply
    and no parameter-sized temporary (with a loss scale, one multiply by ``1 / loss_scale``).
    The add is the ``acc_add`` kernel of ``mcore.fusions`` when the registry chooses it (float32
    parameters, no loss scale; the same sums as ``ops.assign_add``)."""

    def __init__(self, loss_cell: LossCell, params, acc, loss_scale: float = 1.0):
        super().__init__()
        self.loss_cell, self.params, self.acc = loss_cell, params, acc
        self.loss_scale = float(loss_scale)
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        plain = self.loss_scale == 1.0 and all(p.dtype == ms.float32 for p in params)
        self.acc_add = fused_cell("acc_add") if plain else None
        self.fused = self.acc_add is not None

    def construct(self, inputs, labels, scale, position_ids=None, segment_ids=None, denom=None):
        loss = self.loss_cell(inputs, labels, position_ids, segment_ids, denom)
        if self.loss_scale == 1.0:
            sens = ops.ones_like(loss) * scale  # d(scale loss)/dw = scale dloss/dw
        else:  # backward of loss_scale * loss, unscaled below
            sens = ops.ones_like(loss) * self.loss_scale
        grads = self.grad(self.loss_cell, self.params)(inputs, labels, position_ids, segment_ids,
                                                       denom, sens)
        if self.fused:
            done = []
            for i in range(len(self.acc)):
                done.append(self.acc_add(self.acc[i], grads[i]))
            return ops.depend(loss, ops.cat(done))  # keeps every call in the graph
        if self.loss_scale == 1.0:
            for i in range(len(self.acc)):
                ops.assign_add(self.acc[i], grads[i])
        else:
            scale = scale / self.loss_scale
            for i in range(len(self.acc)):
                ops.assign_add(self.acc[i], grads[i] * scale)
        return loss


def build_update(params, acc, decay: list[bool], plans: list, dims: ParallelDims, opt_cfg):
    """The update graph of ``TrainStep`` and ``PipelineTrainStep``: ``AdamWUpdate``, or with
    ``optimizer.distributed`` the
    ZeRO-1 ``DistributedAdamW`` (same contract, moments sharded over dp;
    ``mcore/distributed/distributed_optimizer.py``); ``PipelineTrainStep`` uses it too."""
    if getattr(opt_cfg, "distributed", False):
        from mcore.distributed.distributed_optimizer import DistributedAdamW

        return DistributedAdamW(params, acc, decay, plans, dims, opt_cfg, opt_cfg.bucket_size)
    return AdamWUpdate(params, acc, decay, plans, dims, opt_cfg)


def assign_in_place(param: Parameter, value) -> None:
    """Write ``value`` into ``param``'s existing buffer (``ops.assign``). Unlike ``set_data``,
    which gives the Parameter a new buffer, this is seen by graphs compiled with
    ``mindspore.jit`` before the write (docs/MINDSPORE_JIT_NOTES.md)."""
    ops.assign(param, ms.Tensor(np.asarray(value), param.dtype))


def _set_data(param: Parameter, value) -> None:
    param.set_data(ms.Tensor(np.asarray(value), ms.float32))


class TrainingStopped(FloatingPointError):
    """The loop stops a diverging run on purpose (``training.max_skipped_steps`` skipped steps
    in a row, or a NaN tensor at a save); the message is one line for the user (a
    ``FloatingPointError``: the entry points print ``numerical error: ...`` and exit 2,
    ``training.errors``) and the checkpoints on disk are left as they were."""


def update_applied(loss: float, grad_norm: float) -> bool:
    """The skip rule (``AdamWUpdate`` applies the same one in its graph): an optimizer step
    updates weights and moments only when the loss and the global gradient norm are finite."""
    return math.isfinite(loss) and math.isfinite(grad_norm)


class TrainState:
    """What ``TrainStep`` and ``PipelineTrainStep`` share: the update bookkeeping
    (``apply_update``: bias correction from ``adam_steps``, the skip rule, ``skipped_in_a_row``)
    and the checkpoint state of ``self.named`` ((name, Parameter) pairs) and ``self.update`` (an
    ``AdamWUpdate``, run through ``self._update``): ``model_state()``, ``state_dict()`` (moments
    named ``adam_m.<param>`` / ``adam_v.<param>``), ``scalars()`` (``{"adam_steps": n}``, for the
    checkpoint's meta), ``load(model_state, optimizer_state, scalars)`` (also after steps have
    run: then written in place), ``shapes()``."""

    named: list
    buffers: tuple = ()  # (name, Parameter) pairs saved with the model but not trained (expert bias)
    moe_stats = None  # MoE: training.moe_step.MoEStats of the step being run
    moe_stage = None  # MoE with pp: training.moe_step.StageLayers of this rank
    bias_routers: tuple = ()  # MoE: [(row of the counts, router)] with expert_bias on
    last_moe_metrics = None  # MoE: training.logger.moe_metrics of the last step
    last_moe_counts = None  # MoE: tokens per expert [L, E] of the last step, global batch
    last_mtp_metrics = None  # multi-token prediction: mtp_metrics of the last step
    update: AdamWUpdate
    opt: object  # OptimizerConfig: beta1, beta2
    adam_steps: int = 0  # updates applied (AdamW's t for the next update is adam_steps + 1)
    skipped_in_a_row: int = 0  # consecutive steps whose update was skipped
    stepped: bool = False  # an update graph has run (``load`` then writes in place)

    def _update(self, *args):
        return self.update(*args)

    def apply_update(self, lr: float, loss: float) -> tuple[float, float]:
        """Run ``self.update`` on the accumulated gradients with AdamW step ``adam_steps + 1``;
        count it as applied or skipped (``update_applied``). Returns ``(loss, grad_norm)``: the
        loss averaged over dp (x cp), the norm before clipping (inf or nan for a skipped step)."""
        t = self.adam_steps + 1
        self.stepped = True
        bc1, bc2 = 1.0 - self.opt.beta1 ** t, 1.0 - self.opt.beta2 ** t
        norm, loss = self._update(ms.Tensor(lr, ms.float32), ms.Tensor(bc1, ms.float32),
                                  ms.Tensor(bc2, ms.float32), ms.Tensor(loss, ms.float32))
        loss, norm = float(loss.asnumpy()), float(norm.asnumpy())
        if update_applied(loss, norm):
            self.adam_steps, self.skipped_in_a_row = t, 0
        else:
            self.skipped_in_a_row += 1
        return loss, norm

    def finish_moe(self, applied: bool) -> None:
        """MoE: the step's ``last_moe_metrics`` / ``last_moe_counts`` from ``moe_stats``
        (over dp, and pp with ``moe_stage``), then, if the update was ``applied``, the expert
        biases of ``bias_routers`` (``training.moe_step``; collectives: every rank calls)."""
        self.last_moe_metrics, self.last_moe_counts = self.moe_stats.finish(self.dims.dp,
                                                                            self.moe_stage)
        if self.bias_routers and applied:  # not on a skipped step
            from training.moe_step import update_expert_biases

            update_expert_biases(self.bias_routers, self.last_moe_counts)

    def scalars(self) -> dict:
        """Optimizer scalars for a checkpoint's meta (``load`` takes them back); ``distributed``:
        the moments were saved as distributed-optimizer pieces)."""
        out = {"adam_steps": int(self.adam_steps)}
        if self._sharded():
            out["distributed"] = True
        return out

    def _sharded(self) -> bool:
        """Whether the update keeps only this rank's shard of the moments (ZeRO-1)."""
        return bool(getattr(getattr(self, "update", None), "sharded", False))

    def model_state(self) -> dict[str, np.ndarray]:
        """Trained parameters and ``buffers`` by name."""
        return {n: p.asnumpy().copy() for n, p in [*self.named, *self.buffers]}  # asnumpy() aliases

    def state_dict(self) -> dict[str, np.ndarray]:
        if self._sharded():  # ZeRO-1: this rank's pieces (DistributedAdamW.shard_state)
            return self.update.shard_state()
        out = {}
        for (n, _), m, v in zip(self.named, self.update.m, self.update.v):
            out[f"adam_m.{n}"], out[f"adam_v.{n}"] = m.asnumpy().copy(), v.asnumpy().copy()
        return out

    def load(self, model_state: dict, optimizer_state: dict, scalars: dict) -> None:
        """Restore weights, moments and the update count saved by ``model_state`` /
        ``state_dict`` / ``scalars``. Before the first step values are set with ``set_data``;
        after steps have run they are written in place (``assign_in_place``), so the graphs
        already compiled see them."""
        self.adam_steps, self.skipped_in_a_row = int(scalars["adam_steps"]), 0
        put = assign_in_place if self.stepped else _set_data
        for n, p in [*self.named, *self.buffers]:
            put(p, model_state[n])
        if self._sharded():  # full moments in, this rank's shard kept
            self.update.load_full_moments(optimizer_state, in_place=self.stepped)
        else:
            for (n, _), m, v in zip(self.named, self.update.m, self.update.v):
                put(m, optimizer_state[f"adam_m.{n}"])
                put(v, optimizer_state[f"adam_v.{n}"])

    def shapes(self) -> tuple[dict, dict]:
        """Expected ``(model, optimizer)`` tensor shapes for ``load_checkpoint``."""
        model = {n: tuple(p.shape) for n, p in self.named}
        optim = {f"adam_{k}.{n}": s for n, s in model.items() for k in ("m", "v")}
        model.update({n: tuple(p.shape) for n, p in self.buffers})
        return model, optim


class TrainStep(TrainState):
    """Gradient accumulation + dp all-reduce + clipping + AdamW for ``model``; see module doc
    (checkpoint state: ``TrainState``)."""

    def __init__(self, model, dims: ParallelDims, opt_cfg, grad_accum_steps: int,
                 dtype: str = "fp32", loss_scale: float = 1.0):
        self.model, self.dims, self.opt = model, dims, opt_cfg
        self.n_micro = int(grad_accum_steps)
        self.dtype, self.loss_scale = dtype, float(loss_scale)
        self.cast_cells = apply_compute_dtype(model, dtype)
        self.named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
        self.params = ParameterTuple([p for _, p in self.named])
        self.acc = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"grad_acc.{p.name}",
                                             requires_grad=False) for p in self.params])
        plans = grad_plans(self.named, tp_split_names(model), dims)
        decay = [should_decay(n, len(p.shape)) for n, p in self.named]
        self.loss_cell = LossCell(model)
        self.moe_layers = tuple(getattr(model, "moe_layers", ()))
        self.mtp = getattr(model, "mtp", None) is not None
        if self.moe_layers:  # the loss includes the router losses (training/moe_step.py)
            from training.moe_step import MoEStats, bias_routers

            self.moe_stats, self.moe_top_k = MoEStats(), model.config.moe.top_k
            self.bias_routers = bias_routers(model)  # [(row, router)] with expert_bias on
            ids = {id(r.expert_bias) for _, r in self.bias_routers}
            self.buffers = tuple((n, p) for n, p in model.parameters_and_names() if id(p) in ids)
        if self.moe_layers or self.mtp:  # loss = lm + router losses + MTP term (GPTModel.loss_terms)
            from training.moe_step import MoEForwardBackward, MoELossCell

            self.forward_backward = MoEForwardBackward(MoELossCell(model, self.loss_scale),
                                                       self.params, self.acc)
        else:
            self.forward_backward = ForwardBackward(self.loss_cell, self.params, self.acc,
                                                    self.loss_scale)
        self.update = build_update(self.params, self.acc, decay, plans, dims, opt_cfg)

    def __call__(self, micro_batches, lr: float) -> tuple[float, float]:
        """One optimizer step. ``micro_batches``: ``n`` (inputs, labels) numpy int32 pairs, or
        packed 4-tuples (loss: mean over the global batch's kept tokens, ``training.packed_loss``).
        Returns ``(loss, grad_norm)``: loss averaged over micro-batches and dp (x cp); a non-finite
        one of the two means the update was skipped (``TrainState.apply_update``). A MoE model
        (``model.moe_layers``) trains on ``loss + router losses`` and reports the language-model
        loss; ``last_moe_metrics`` and ``last_moe_counts`` then hold the step's routing statistics,
        and an applied step moves the routers' expert biases (``training/moe_step.py``). With
        ``model.mtp`` it also trains on the MTP term, whose losses are in ``last_mtp_metrics``.
        Packed batches with either: the language-model and MTP losses are sums / the global
        batch's kept-token count (``GPTModel.loss_terms``), the router losses as unpacked."""
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"got {len(micro_batches)} micro-batches, expected grad_accum_steps="
                             f"{self.n_micro}")
        scale = ms.Tensor(1.0 / self.n_micro, ms.float32)
        total, mtp_total, extra = 0.0, 0.0, ()
        if len(micro_batches[0]) == 4:  # packed: mean over the global batch's kept tokens
            extra = (packed_denominator(micro_batches, self.dims.dp),)
        for batch in micro_batches:
            if self.dims.cp.size > 1:  # this rank's s/cp tokens and their positions
                batch = cp_micro_batch(batch, self.dims.cp)
            inputs, labels, *rest = [ms.Tensor(x, ms.int32) for x in batch]
            loss = self.forward_backward(inputs, labels, scale, *rest, *extra)
            if self.moe_layers or self.mtp:  # (lm_loss, aux [L, 3], counts [L, E], mtp [D])
                loss, aux, counts, mtp = loss
                mtp_total = mtp_total + mtp.asnumpy().astype(np.float64)
            if self.moe_layers:
                self.moe_stats.add(aux, counts, batch[0].size * self.moe_top_k * len(self.moe_layers))
            total += float(loss.asnumpy())
        applied_before = self.adam_steps
        out = self.apply_update(lr, total / self.n_micro)
        if self.moe_layers:
            self.finish_moe(self.adam_steps > applied_before)
        if self.mtp:  # per-depth losses, mean over micro-batches and dp
            mtp, dp = ms.Tensor(np.asarray(mtp_total / self.n_micro, np.float32)), self.dims.dp
            self.last_mtp_metrics = mtp_metrics((all_reduce(mtp, dp) / dp.size).asnumpy()
                                                if dp.size > 1 else mtp.asnumpy())
        return out

    def evaluate(self, batches) -> float:
        """Mean loss over ``batches`` ((inputs, labels) pairs) on this rank, then over dp (and
        cp: each sequence split over it)."""
        return mean_loss(self.loss_cell, batches, self.dims.dp_cp, self.dims.cp)
