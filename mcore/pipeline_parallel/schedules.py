"""Pipeline schedules: no pipelining, 1F1B and interleaved 1F1B, behind one signature.

``forward_backward_func(forward_step_func, data_iterator, model, num_microbatches, seq_length,
micro_batch_size, forward_only=False, stage_inputs=None) -> ScheduleResult``

- ``model``: a ``PipelineModel`` (this rank's compiled chunks, its ``ParallelDims``, the
  activation shape); ``get_forward_backward_func(pp, vpp)`` returns the function for a layout.
- ``forward_step_func(data_iterator, chunk) -> (inputs, labels)``: the next micro-batch. Called
  once per micro-batch on the chunk that runs the first virtual stage (uses ``inputs``) and on
  the one that runs the last (uses ``labels``); other ranks never touch the data.
  ``data_iterator`` may be one iterator or a list with one per local chunk (as in Megatron).
- ``stage_inputs`` (packed sequences, e.g. fine-tuning; None otherwise): per micro-batch
  ``(position_ids, key_mask, denom)``, given on every rank. Every stage's forward and backward
  take ``side = (position_ids, key_mask)`` and the last stage's loss ``denom``
  (``stage.StageRunner``); these are not exchanged between stages.
- Result on EVERY rank: ``loss`` (mean over micro-batches, broadcast from the last stage),
  ``grads[c]`` (per local chunk, parameter gradients of the micro-batch mean loss, accumulated),
  ``trace`` (the actions run, in order), ``peak_inflight`` (most micro-batches held at once
  between their forward and backward: stage inputs kept for the backward),
  ``compute_seconds`` (see ``PipelineModel.time_actions``), ``aux[c]`` (per local chunk whose
  stage has auxiliary losses, ``StageRunner.has_aux``: the ``(aux, stats)`` tensors of each
  micro-batch in forward order; training only, empty lists otherwise).
- Auxiliary losses (e.g. MoE router losses): every such stage adds the gradient of its own
  ``aux.sum()`` in its backward with the loss's scale (``loss_scale / num_microbatches``), so
  ``grads`` are those of ``mean over micro-batches of (loss + every stage's aux.sum())``;
  ``loss`` stays the mean of the ``loss_fn`` values.

How a step runs: ``schedule_order`` gives this rank's order of forwards and backwards,
``comm_plan.build_plans`` interleaves it with the exchanges that every neighbour makes in the
same order (matched and deadlock-free by construction, checked by ``comm_plan.simulate``), and
``_run_plan`` below executes it. Each forward is a compiled stage graph; each backward one
compiled graph that recomputes the stage from its saved input and differentiates it (see
``stage.StageRunner`` for why); the last stage computes loss and gradients in one compiled
``value_and_grad`` at its forward. An output is dropped as soon as its exchange has sent it
(Megatron's deallocation) and an input as soon as its backward ran, so a rank holds at most
``schedule_order.inflight_bound`` micro-batches (1F1B: ``min(pp - rank, m)``).
"""
from __future__ import annotations

import time
from typing import NamedTuple

import mindspore as ms

from mcore.comm.collectives import broadcast
from mcore.pipeline_parallel import p2p
from mcore.pipeline_parallel.comm_plan import Exchange, Msg, build_plans
from mcore.pipeline_parallel.schedule_order import (check_interleaved, interleaved_order,
                                                     no_pipelining_order, one_f_one_b_order)
from mcore.pipeline_parallel.stage import PipelineModel


class ScheduleResult(NamedTuple):
    """What one ``forward_backward_func`` call returns on every rank (see module docstring)."""

    loss: float
    grads: list
    trace: list
    peak_inflight: int
    compute_seconds: float
    aux: tuple = ()


def _sync(*tensors) -> None:
    """Wait for the queued ops that produced ``tensors`` (PyNative runs ops asynchronously;
    ``mindspore.runtime.synchronize`` reports "CPU device is not supported" on CPU)."""
    for t in tensors:
        if t is not None:
            t.asnumpy()


def _add(acc, grads):
    return grads if acc is None else tuple(a + g for a, g in zip(acc, grads))


class _State:
    """Tensors of one rank during one schedule run (local to ``_run_plan``)."""

    def __init__(self, vpp: int):
        self.inbox = {}    # Msg -> received tensor: a next input (act) / an output grad (grad)
        self.outbox = {}   # Msg -> produced tensor waiting for its exchange; dropped once sent
        self.held = {}     # (mb, chunk) -> stage input kept for the backward / last-stage grads
        self.grads = [None] * vpp   # per chunk: accumulated parameter gradients
        self.losses = []
        self.aux = [[] for _ in range(vpp)]  # per chunk: (aux, stats) per micro-batch


def _side(stage_inputs, mb):
    """``(side, denom)`` of micro-batch ``mb`` for the stage steps (``((), None)``: unpacked)."""
    if stage_inputs is None:
        return (), None
    position_ids, key_mask, denom = stage_inputs[mb]
    return (position_ids, key_mask), denom


def _forward(st, step, v, last, runner, scale, forward_step_func, data_iterator,
             forward_only, stage_inputs):
    """Run forward ``step`` of virtual stage ``v``; return a tensor it produced (for timing)."""
    mb, c = step.microbatch, step.chunk
    side, denom = _side(stage_inputs, mb)
    x = st.inbox.pop(Msg("act", mb, v - 1)) if v > 0 else None
    if v in (0, last):       # the data: inputs for the first virtual stage, labels for the last
        it = data_iterator[c] if isinstance(data_iterator, (list, tuple)) else data_iterator
        inputs, labels = forward_step_func(it, runner)
        x = inputs if v == 0 else x
    if v == last and forward_only:
        st.losses.append(runner.loss(x, labels, side, denom))
        return st.losses[-1]
    if v == last:            # loss, input grad and param grads in one compiled step
        loss, dx, dw, aux, stats = runner.loss_grads_and_aux(x, labels, scale, side, denom)
        st.losses.append(loss)
        st.held[(mb, c)] = (dx, dw)
        if runner.has_aux:
            st.aux[c].append((aux, stats))
        return loss
    if runner.has_aux and not forward_only:
        out, aux, stats = runner.forward_with_aux(x, side)
        st.aux[c].append((aux, stats))
    else:
        out = runner.forward(x, side)
    st.outbox[Msg("act", mb, v)] = out
    if not forward_only:
        st.held[(mb, c)] = x   # the backward recomputes the stage from its input
    return out


def _backward(st, step, v, last, runner, scale, stage_inputs):
    """Run backward ``step`` of virtual stage ``v``; return a tensor it produced (for timing)."""
    mb, c = step.microbatch, step.chunk
    saved = st.held.pop((mb, c))
    if v == last:
        dx, dw = saved
    else:
        dx, dw = runner.backward(saved, st.inbox.pop(Msg("grad", mb, v + 1)), scale,
                                 _side(stage_inputs, mb)[0])
    st.grads[c] = _add(st.grads[c], dw)
    if v > 0:
        st.outbox[Msg("grad", mb, v)] = dx
    return st.grads[c][-1] if st.grads[c] else dx


def _run_plan(plan, model: PipelineModel, forward_step_func, data_iterator, m, shape,
              forward_only, stage_inputs=None):
    """Execute this rank's program (actions and exchanges); return a ``ScheduleResult``."""
    dims = model.dims
    pp, me, vpp = dims.pp.size, dims.pp_stage, len(model.chunks)
    last = pp * vpp - 1
    st = _State(vpp)
    trace, peak, busy = [], 0, 0.0
    for step in plan:
        if isinstance(step, Exchange):   # one collective with a neighbour, both directions
            pair = dims.pp_next_pair if step.peer == (me + 1) % pp else dims.pp_prev_pair
            sends = [st.outbox.pop(k) for k in step.send]   # released once sent
            got = p2p.communicate(sends, [shape] * len(step.recv), pair, model.dtype)
            st.inbox.update(zip(step.recv, got))
            continue
        trace.append(step)
        start = time.perf_counter()
        v, runner = step.chunk * pp + me, model.chunks[step.chunk]
        if step.kind == "F":
            done = _forward(st, step, v, last, runner, model.loss_scale / m, forward_step_func,
                            data_iterator, forward_only, stage_inputs)
            peak = max(peak, len(st.held))
        else:
            done = _backward(st, step, v, last, runner, model.loss_scale / m, stage_inputs)
        if model.time_actions:
            _sync(done)
            busy += time.perf_counter() - start
    if st.outbox or st.inbox or st.held:
        raise RuntimeError(f"pipeline rank {me}: schedule ended with unsent {list(st.outbox)}, "
                           f"unused {list(st.inbox)}, held {list(st.held)}")
    losses = st.losses
    mean = sum(losses[1:], losses[0]) / m if losses else ms.Tensor(0.0, ms.float32)
    mean = broadcast(mean.astype(ms.float32), dims.pp, src=pp - 1)  # every rank reports it
    return ScheduleResult(float(mean.asnumpy()), st.grads, trace, peak, busy, st.aux)


def _schedule(orders_of_rank, name):
    def forward_backward(forward_step_func, data_iterator, model: PipelineModel,
                         num_microbatches: int, seq_length: int, micro_batch_size: int,
                         forward_only: bool = False, stage_inputs=None) -> ScheduleResult:
        dims = model.dims
        pp, vpp = dims.pp.size, len(model.chunks)
        orders = [orders_of_rank(pp, vpp, r, num_microbatches, forward_only) for r in range(pp)]
        plan = build_plans(orders, vpp)[dims.pp_stage]
        shape = model.activation_shape(seq_length, micro_batch_size)
        if stage_inputs is not None and len(stage_inputs) != num_microbatches:
            raise ValueError(f"stage_inputs has {len(stage_inputs)} entries for "
                             f"{num_microbatches} micro-batches")
        return _run_plan(plan, model, forward_step_func, data_iterator, num_microbatches, shape,
                         forward_only, stage_inputs)

    forward_backward.__name__ = forward_backward.__qualname__ = name
    forward_backward.__doc__ = f"{name}: see the ``mcore.pipeline_parallel.schedules`` docstring."
    return forward_backward


def _no_pipelining(pp, vpp, rank, m, forward_only):
    if pp != 1 or vpp != 1:
        raise ValueError(f"no-pipelining schedule needs pp size 1 and 1 chunk, got {pp}, {vpp}")
    return no_pipelining_order(m, forward_only)


def _one_f_one_b(pp, vpp, rank, m, forward_only):
    if vpp != 1:
        raise ValueError(f"1F1B schedule needs 1 model chunk per rank, got {vpp} (interleaved)")
    return one_f_one_b_order(pp, rank, m, forward_only)


def _interleaved(pp, vpp, rank, m, forward_only):
    check_interleaved(pp, vpp, m)
    return interleaved_order(pp, vpp, rank, m, forward_only)


forward_backward_no_pipelining = _schedule(_no_pipelining, "forward_backward_no_pipelining")
forward_backward_pipelining_without_interleaving = _schedule(
    _one_f_one_b, "forward_backward_pipelining_without_interleaving")
forward_backward_pipelining_with_interleaving = _schedule(
    _interleaved, "forward_backward_pipelining_with_interleaving")


def get_forward_backward_func(pp: int, vpp: int = 1):
    """The schedule for ``pp`` stages of ``vpp`` chunks each (Megatron's chooser)."""
    if pp < 1 or vpp < 1:
        raise ValueError(f"pp size ({pp}) and vpp size ({vpp}) must be >= 1")
    if pp == 1:
        if vpp != 1:
            raise ValueError(f"vpp size ({vpp}) > 1 needs pp size > 1 (got pp size 1)")
        return forward_backward_no_pipelining
    if vpp == 1:
        return forward_backward_pipelining_without_interleaving
    return forward_backward_pipelining_with_interleaving
