"""A pipeline stage built from any list of Cells, and its compiled forward / backward steps.

Layer assignment: ``split_layers(num_layers, pp, vpp, layers_per_stage)`` gives the layer range
of every virtual stage ``v`` (on rank ``v % pp``, chunk ``v // pp``); ``layers_per_stage``
lists explicit counts for uneven splits, e.g. ``[3, 1]`` for 4 layers on 2 stages.

``PipelineStage(layers, pre_process=..., post_process=..., loss_fn=...)``: ``pre_process`` is a
Cell run first, only on the first virtual stage (e.g. the embedding, taking token ids);
``post_process`` runs last, only on the last virtual stage (e.g. final norm + output layer),
followed by ``loss_fn(output, labels) -> scalar``. A stage that is one Cell taking token ids
on the first stage (a GPTModel stage, ``models.gpt_pipeline``) passes ``is_first=True``
instead of a ``pre_process``.

``StageRunner`` compiles the stage's graphs once (``mindspore.jit``) and exposes the steps the
schedules need:

- ``forward(x)``: the output, no graph kept;
- ``backward(x, output_grad) -> (input_grad, param_grads)``: ONE compiled graph that recomputes
  the stage forward from its input and differentiates it (``GradOperation`` with the output
  gradient as sensitivity). So a stage keeps only its *input* per micro-batch in flight, and
  pays one extra forward per micro-batch (stage-level activation recomputation);
- ``loss_and_grads(x, labels, scale)`` (last stage) -> ``(loss, input_grad, param_grads)``,
  gradients of ``scale * loss``, one compiled graph with ``value_and_grad`` inside (no
  recompute needed).

Packed sequences (fine-tuning): every step also takes ``side = (position_ids, key_mask)``
(int32 ``[b, s]``: positions restarting per sample, segment ids), passed to every layer as
``layer(x, position_ids, key_mask)``, and the loss a ``denom``: ``loss_fn(output, labels,
denom)``. Without them (``side=()``, ``denom=None``) the stage runs exactly as before
(``layer(x)``, ``loss_fn(output, labels)``; the same compiled graphs).

Stages with auxiliary losses (``with_aux=True``, e.g. mixture-of-experts router losses): every
layer returns ``(x, aux, stats)`` and the stage ``(out, aux, stats)``, both concatenated over
its layers along axis 0. ``aux`` is part of the TRAINING loss, ``stats`` are reported values
(never differentiated). Each stage adds the gradient of its own ``aux.sum()`` locally, scaled
like the loss: its backward differentiates ``sum(out * dout) + aux_scale * aux.sum()`` (the
output gradient ``dout`` already carries the loss scale of the stages after it) and the last
stage ``scale * (loss + aux.sum())``. The reported loss stays ``loss`` (the ``loss_fn`` value);
``forward_with_aux`` / ``loss_grads_and_aux`` return ``aux`` and ``stats`` of the micro-batch.

Why recompute: MindSpore 2.10 PyNative keeps ONE pending ``mindspore.vjp`` at a time. A second
``vjp`` before the first closure is used makes the first fail ("Can not find top cell for
backward"), in PyNative and with a jitted Cell alike, and 1F1B needs up to ``pp`` pending.
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import ParameterTuple, nn, ops

from mcore.parallel_state import ParallelDims


def split_layers(num_layers: int, pp: int, vpp: int = 1,
                 layers_per_stage: list[int] | None = None) -> list[range]:
    """Layer index range of each virtual stage ``v = chunk * pp + rank`` (``pp * vpp`` ranges)."""
    n = pp * vpp
    where = f"{n} virtual stages (pp {pp} x vpp {vpp})"
    if layers_per_stage is None:
        if num_layers % n:
            raise ValueError(f"{num_layers} layers do not split evenly over {where}: pass "
                             f"layers_per_stage (explicit per-stage counts)")
        layers_per_stage = [num_layers // n] * n
    counts = list(layers_per_stage)
    if len(counts) != n:
        raise ValueError(f"layers_per_stage has {len(counts)} entries for {where}")
    if sum(counts) != num_layers or min(counts) < 0:
        raise ValueError(f"layers_per_stage {counts} must be non-negative and sum to "
                         f"num_layers ({num_layers})")
    starts = [sum(counts[:v]) for v in range(n)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def sync_embedding_grads(grads, dims: ParallelDims, params=None):
    """Sum the gradients of a tied embedding over the embedding group (Megatron's
    ``_allreduce_embedding_grads``): the first stage holds the input embedding and the last the
    output layer sharing its weight; after the sum both apply the same update. ``grads``: one
    tensor or a tuple. A middle stage is alone in its embedding group: returned unchanged.

    With ``params`` (aligned with ``grads``, e.g. ``model.chunks[c].params`` and
    ``result.grads[c]``) only the gradients of parameters marked ``shared_embedding = True``
    (``models.gpt.GPTModel`` stages) are summed, the others returned as they are. Call it for
    every local chunk on every rank: the first and the last stage each make one all-reduce."""
    from mcore.comm.collectives import all_reduce

    if params is not None:
        return type(grads)(all_reduce(g, dims.embedding)
                           if getattr(p, "shared_embedding", False) else g
                           for p, g in zip(params, grads, strict=True))
    if isinstance(grads, (list, tuple)):
        return type(grads)(all_reduce(g, dims.embedding) for g in grads)
    return all_reduce(grads, dims.embedding)


class PipelineStage(nn.Cell):
    """``x -> pre_process -> layers -> post_process`` for one (virtual) stage.

    Input: token ids (or whatever ``pre_process`` takes) on the first stage, else the previous
    stage's activation. Output: ``post_process``'s output on the last stage, else the activation
    sent on. ``loss_fn`` (last stage only): ``(output, labels) -> scalar loss``.
    ``is_first`` / ``is_last`` (None: derived from ``pre_process`` / ``post_process`` and
    ``loss_fn``) say whether the input is data (no input gradient) / the stage ends the model.
    ``with_aux``: every layer returns ``(x, aux, stats)`` and the stage returns ``(out, aux,
    stats)`` (see the module docstring)."""

    def __init__(self, layers, pre_process=None, post_process=None, loss_fn=None,
                 is_first: bool | None = None, is_last: bool | None = None,
                 with_aux: bool = False):
        super().__init__()
        self.with_aux = bool(with_aux)
        self.is_first = pre_process is not None if is_first is None else bool(is_first)
        if is_last is None:
            is_last = post_process is not None or loss_fn is not None
        self.is_last = bool(is_last)
        self.pre_process = pre_process
        self.stage_layers = nn.CellList(list(layers))
        self.post_process = post_process
        self.loss_fn = loss_fn

    def construct(self, x, position_ids=None, key_mask=None):
        if self.pre_process is not None:
            x = self.pre_process(x)
        packed = position_ids is not None or key_mask is not None
        if self.with_aux:
            auxes, stats = (), ()
            for layer in self.stage_layers:
                if packed:
                    x, aux, stat = layer(x, position_ids, key_mask)
                else:
                    x, aux, stat = layer(x)
                auxes += (aux,)
                stats += (stat,)
        else:
            for layer in self.stage_layers:
                x = layer(x, position_ids, key_mask) if packed else layer(x)
        if self.post_process is not None:
            x = self.post_process(x)
        if self.with_aux:
            return x, ops.concat(auxes, 0), ops.concat(stats, 0)  # n x [L_i, ..] -> [sum L_i, ..]
        return x


class _StageLoss(nn.Cell):
    """``(scale * loss, loss)`` of the last stage; ``scale`` (1 / num_microbatches) makes the
    accumulated gradients those of the micro-batch mean. ``with_aux``: ``(scale * (loss +
    aux.sum()), loss, aux, stats)``."""

    def __init__(self, stage: PipelineStage):
        super().__init__()
        self.stage = stage

    def construct(self, x, labels, scale, position_ids=None, key_mask=None, denom=None):
        if self.stage.with_aux:
            out, aux, stats = self.stage(x, position_ids, key_mask)
            loss = self._loss(out, labels, denom)
            return (loss + aux.sum()) * scale, loss, aux, stats
        loss = self._loss(self.stage(x, position_ids, key_mask), labels, denom)
        return loss * scale, loss

    def _loss(self, out, labels, denom):
        if denom is None:
            return self.stage.loss_fn(out, labels)
        return self.stage.loss_fn(out, labels, denom)


class _StageLossGrad(nn.Cell):
    """``(x, labels, scale) -> ((scale * loss, loss), grads)`` of the last stage as ONE graph:
    ``grads`` = param grads (first stage: its input is token ids) or ``(input_grad, param
    grads)``. Differentiating inside the compiled graph, not ``mindspore.value_and_grad`` of a
    jitted Cell from Python: the latter fails to compile on MindSpore 2.10 when the loss has
    a custom ``bprop`` (vocab-parallel cross-entropy: "func_graph->get_return() is null")."""

    def __init__(self, stage: PipelineStage):
        super().__init__()
        self.loss = _StageLoss(stage)
        self.weights = ParameterTuple(stage.trainable_params())
        self.position = None if stage.is_first else 0

    def construct(self, x, labels, scale, position_ids=None, key_mask=None, denom=None):
        return ms.value_and_grad(self.loss, self.position, self.weights, has_aux=True)(
            x, labels, scale, position_ids, key_mask, denom)  # all six: no defaults inside


class _StageBackward(nn.Cell):
    """``(x, dout) -> (input_grads, param_grads)`` (or ``param_grads`` alone on the first
    stage, whose input is token ids): the stage forward recomputed and differentiated with
    ``dout`` as the output's sensitivity, as one graph."""

    def __init__(self, stage: PipelineStage):
        super().__init__()
        self.stage = stage
        self.weights = ParameterTuple(stage.trainable_params())
        self.grad = ops.GradOperation(get_all=not stage.is_first, get_by_list=True,
                                      sens_param=True)

    def construct(self, x, dout, position_ids=None, key_mask=None):
        if position_ids is None and key_mask is None:
            return self.grad(self.stage, self.weights)(x, dout)
        return self.grad(self.stage, self.weights)(x, position_ids, key_mask, dout)


class _AuxObjective(nn.Cell):
    """``(x, dout, aux_scale) -> sum(out * dout) + aux_scale * aux.sum()`` of a ``with_aux``
    stage: its gradient is the output's backward with sensitivity ``dout`` plus the stage's own
    auxiliary losses (``d/d out`` of ``sum(out * dout)`` is ``dout`` exactly)."""

    def __init__(self, stage: PipelineStage):
        super().__init__()
        self.stage = stage

    def construct(self, x, dout, aux_scale, position_ids=None, key_mask=None):
        out, aux, _ = self.stage(x, position_ids, key_mask)
        return (out * dout).sum() + aux.sum() * aux_scale


class _StageAuxBackward(nn.Cell):
    """``_StageBackward`` of a ``with_aux`` stage: ``(x, dout, aux_scale) -> (input_grads,
    param_grads)`` (first stage: ``param_grads``) of ``_AuxObjective``, as one graph."""

    def __init__(self, stage: PipelineStage):
        super().__init__()
        self.objective = _AuxObjective(stage)
        self.weights = ParameterTuple(stage.trainable_params())
        self.grad = ops.GradOperation(get_all=not stage.is_first, get_by_list=True)

    def construct(self, x, dout, aux_scale, position_ids=None, key_mask=None):
        if position_ids is None and key_mask is None:
            return self.grad(self.objective, self.weights)(x, dout, aux_scale)
        return self.grad(self.objective, self.weights)(x, dout, aux_scale, position_ids,
                                                       key_mask)


class StageRunner:
    """Compiled steps of one ``PipelineStage`` (``jit=False``: PyNative, for debugging).
    ``has_aux``: the stage returns auxiliary losses (``PipelineStage.with_aux``)."""

    def __init__(self, stage: PipelineStage, jit: bool = True):
        self.stage = stage
        self.has_aux = stage.with_aux
        self.params = stage.trainable_params()
        self._fwd = ms.jit(stage) if jit else stage
        self._bwd = _StageAuxBackward(stage) if self.has_aux else _StageBackward(stage)
        self._bwd = ms.jit(self._bwd) if jit else self._bwd
        self._grad = None
        if stage.loss_fn is not None:
            self._grad = _StageLossGrad(stage)
            self._grad = ms.jit(self._grad) if jit else self._grad

    def forward(self, x, side=()):
        """Stage output (no graph kept: the backward recomputes it from ``x``). ``side``:
        ``(position_ids, key_mask)`` of packed sequences, or ``()``."""
        return self._fwd(x, *side)[0] if self.has_aux else self._fwd(x, *side)

    def forward_with_aux(self, x, side=()):
        """``(out, aux, stats)`` of a ``has_aux`` stage (no graph kept)."""
        if not self.has_aux:
            raise ValueError("forward_with_aux: this stage has no auxiliary losses (with_aux)")
        return self._fwd(x, *side)

    def backward(self, x, dout, aux_scale: float = 1.0, side=()):
        """``(input_grad or None, param_grads)`` of the stage at input ``x`` for output
        gradient ``dout``: one compiled forward + backward graph. A ``has_aux`` stage adds the
        gradient of ``aux_scale * aux.sum()`` (pass the loss's scale); others ignore it."""
        if self.has_aux:
            grads = self._bwd(x, dout, ms.Tensor(aux_scale, ms.float32), *side)
        else:
            grads = self._bwd(x, dout, *side)
        if self.stage.is_first:
            return None, tuple(grads)
        input_grads, param_grads = grads
        return input_grads[0], tuple(param_grads)

    def loss(self, x, labels, side=(), denom=None):
        """Loss of one micro-batch (forward only; without the auxiliary losses); ``denom``
        (packed sequences) is passed to ``loss_fn`` as its third argument."""
        out = self.forward(x, side)
        if denom is None:
            return self.stage.loss_fn(out, labels)
        return self.stage.loss_fn(out, labels, denom)

    def loss_and_grads(self, x, labels, scale: float, side=(), denom=None):
        """``(loss, input_grad or None, param_grads)`` with gradients of ``scale * loss``
        (``has_aux``: of ``scale * (loss + aux.sum())``; ``loss`` is without ``aux``)."""
        return self.loss_grads_and_aux(x, labels, scale, side, denom)[:3]

    def loss_grads_and_aux(self, x, labels, scale: float, side=(), denom=None):
        """``loss_and_grads`` plus the micro-batch's ``aux`` and ``stats`` (None, None for a
        stage without auxiliary losses)."""
        if self._grad is None:
            raise ValueError("loss_and_grads: this stage has no loss_fn (not the last stage)")
        scale = ms.Tensor(scale, ms.float32)
        if side or denom is not None:
            position_ids, key_mask = side if side else (None, None)
            values, grads = self._grad(x, labels, scale, position_ids, key_mask, denom)
        else:
            values, grads = self._grad(x, labels, scale)
        loss, aux, stats = values[1], None, None
        if self.has_aux:
            aux, stats = values[2], values[3]
        if self.stage.is_first:
            return loss, None, tuple(grads), aux, stats
        input_grad, param_grads = grads
        return loss, input_grad, tuple(param_grads), aux, stats


@dataclass
class PipelineModel:
    """What the schedules drive on one rank: its chunks (``chunks[c]`` runs virtual stage
    ``c * pp + rank``), the parallel state, and the shape of the activations between stages:
    ``(micro_batch, seq / tp if sequence_parallel else seq, hidden_size)`` in ``dtype``.
    ``time_actions``: synchronise after every forward / backward and add its wall time to
    ``ScheduleResult.compute_seconds`` (for bubble measurements; slows the step a little).
    ``loss_scale``: the last stage differentiates ``loss_scale * loss / num_microbatches``
    (fp16 loss scaling; the caller unscales the gradients); the reported loss is unscaled."""

    chunks: list
    dims: ParallelDims
    hidden_size: int
    dtype: object = ms.float32
    sequence_parallel: bool = False
    time_actions: bool = False
    loss_scale: float = 1.0

    def activation_shape(self, seq_length: int, micro_batch_size: int) -> tuple:
        seq = seq_length // self.dims.tp.size if self.sequence_parallel else seq_length
        return (micro_batch_size, seq, self.hidden_size)


def build_pipeline_model(pre_process, layers, post_process, loss_fn, dims: ParallelDims,
                         hidden_size: int, vpp: int = 1, layers_per_stage=None,
                         jit: bool = True, **kwargs) -> PipelineModel:
    """This rank's chunks of the model ``pre_process -> layers -> post_process -> loss_fn``
    (``layers`` a list of Cells, split by ``split_layers``). Cells that are not on this rank are
    simply not used; build only the local ones when memory matters."""
    pp, rank = dims.pp.size, dims.pp_stage
    ranges = split_layers(len(layers), pp, vpp, layers_per_stage)
    last = pp * vpp - 1
    chunks = []
    for c in range(vpp):
        v = c * pp + rank
        stage = PipelineStage([layers[i] for i in ranges[v]],
                              pre_process=pre_process if v == 0 else None,
                              post_process=post_process if v == last else None,
                              loss_fn=loss_fn if v == last else None)
        chunks.append(StageRunner(stage, jit=jit))
    return PipelineModel(chunks, dims, hidden_size, **kwargs)
