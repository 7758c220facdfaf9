"""The compiled training step: forward + backward per micro-batch, then one AdamW update.

    step = TrainStep(model, dims, cfg.optimizer, grad_accum_steps)
    loss, grad_norm = step(micro_batches, lr, it)     # micro_batches: [(inputs, labels), ...]

One optimizer step, for ``n`` micro-batches on each of ``D`` data-parallel ranks:

1. ``ForwardBackward`` (one compiled graph, run ``n`` times): ``loss_k = mean over tokens of
   model(inputs, labels=labels)`` and ``acc += d(loss_k / n)/dw`` into fp32 buffers.
2. ``AdamWUpdate`` (one compiled graph):
   - ``g = all_reduce_sum(acc, dp) / D``   (the gradient of the mean loss over the global batch)
   - ``norm = sqrt(all_reduce_sum(sum_sharded g^2, tp) + sum_replicated g^2)``: tp-split
     parameters contribute their shard's squares summed over tp; replicated ones (norm weights)
     count once. ``g *= min(1, clip / (norm + 1e-6))`` when ``clip > 0``.
   - AdamW, for step ``t`` (1-based), decoupled decay (the ``should_decay`` mask)::

         m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
         w = w - lr wd w                (only where decay applies)
         w = w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

   - ``acc = 0``.

Compute dtype (``training.dtype``, ``apply_compute_dtype``): parameters are always fp32 and are
the master weights; AdamW runs on them in fp32. With ``fp16`` every tensor-parallel linear layer
(q/k/v, attention output, MLP, output head) runs its matmul in fp16 (``Cell.to_float``: its input
and weight are cast on the way in); the residual stream, norms, attention scores and softmax,
the logits (cast back to fp32 by a forward hook on the head) and the cross-entropy stay fp32.
fp16 uses a static loss scale ``S`` (``training.loss_scale``, default 1024): backward runs on
``S * loss`` and ``acc += d(S loss_k)/dw * (1 / (n S))``, so the gradients are unscaled before
the dp all-reduce and the clipping; a step whose gradient norm is not finite (an fp16 overflow)
leaves weights and moments unchanged (its norm, inf or nan, is returned). bf16 has no compute
kernels on CPU (``training/pretrain.py:check_supported`` refuses it there).
``mode``: ``set_mode("graph")`` compiles every Cell call (GRAPH_MODE, 3-5x faster than PyNative
on CPU, first compile ~5-15 s); ``"pynative"`` runs eagerly for debugging. Same numbers either way
to fp32 rounding. MindSpore's own ``AdamWeightDecay`` is not used: it has no bias correction
(docs/mindspore_cpu.md).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, nn, ops

from mcore.comm.collectives import all_reduce
from mcore.parallel_state import ParallelDims
from training.optim import should_decay


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
    """(inputs [b, s] int32, labels [b, s] int32) -> mean token cross-entropy (scalar)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, inputs, labels):
        return self.model(inputs, None, None, labels).mean()  # [b, s] -> []


def mean_loss(loss_cell: LossCell, batches, dp_group) -> float:
    """Forward only: mean of ``loss_cell`` over ``batches`` ((inputs, labels) numpy pairs, the
    same count on every dp rank), averaged over the dp group (every rank gets the result)."""
    total = 0.0
    for inputs, labels in batches:
        total += float(loss_cell(ms.Tensor(inputs, ms.int32), ms.Tensor(labels, ms.int32)).asnumpy())
    mean = np.array(total / max(len(batches), 1), np.float32)
    if dp_group.size > 1:
        mean = all_reduce(ms.Tensor(mean), dp_group).asnumpy() / dp_group.size
    return float(mean)


class ForwardBackward(nn.Cell):
    """Returns the micro-batch loss and adds ``scale * dloss/dw`` to the ``acc`` buffers."""

    def __init__(self, loss_cell: LossCell, params, acc, loss_scale: float = 1.0):
        super().__init__()
        self.loss_cell, self.params, self.acc = loss_cell, params, acc
        self.loss_scale = float(loss_scale)
        if self.loss_scale == 1.0:
            self.grad = ops.GradOperation(get_by_list=True)
        else:  # backward of loss_scale * loss (the sensitivity), unscaled below
            self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

    def construct(self, inputs, labels, scale):
        loss = self.loss_cell(inputs, labels)
        if self.loss_scale == 1.0:
            grads = self.grad(self.loss_cell, self.params)(inputs, labels)
        else:
            sens = ops.ones_like(loss) * self.loss_scale
            grads = self.grad(self.loss_cell, self.params)(inputs, labels, sens)
            scale = scale / self.loss_scale
        for i in range(len(self.acc)):
            ops.assign_add(self.acc[i], grads[i] * scale)
        return loss


class AdamWUpdate(nn.Cell):
    """dp-average the accumulated gradients, clip by global norm, AdamW, zero the buffers.

    ``construct(lr, bc1, bc2, loss)``: ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t`` (bias corrections),
    ``loss``: this rank's loss (mean over its micro-batches). Returns ``(grad_norm, mean loss
    over dp)`` as tensors. ``grad_norm`` is measured before clipping.

    Pipeline parallelism (pp > 1): ``in_norm[i] = False`` leaves a parameter out of the norm
    (the last stage's copy of a tied embedding, so the tied weight counts once); the squared
    norm is summed over the pp group (the only collective across stages: stages compile
    different graphs, whose collectives on a shared group could otherwise run in different
    orders).
    """

    def __init__(self, params, acc, decay: list[bool], tp_split: list[bool], dims: ParallelDims,
                 opt_cfg, skip_nonfinite: bool = False, in_norm: list[bool] | None = None):
        super().__init__()
        self.params, self.acc = params, acc
        n = len(params)
        self.in_norm = tuple(in_norm) if in_norm is not None else (True,) * n
        self.pp = dims.pp
        self.skip_nonfinite = bool(skip_nonfinite)
        self.m = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"adam_m.{p.name}")
                                 for p in params])
        self.v = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"adam_v.{p.name}")
                                 for p in params])
        self.decay, self.tp_split = tuple(decay), tuple(tp_split)
        self.dp, self.tp = dims.dp, dims.tp
        self.b1, self.b2, self.eps = float(opt_cfg.beta1), float(opt_cfg.beta2), float(opt_cfg.eps)
        self.wd, self.clip = float(opt_cfg.weight_decay), float(opt_cfg.clip_grad)

    def construct(self, lr, bc1, bc2, loss):
        n = len(self.params)
        grads = []
        for i in range(n):
            g = self.acc[i]
            if self.dp.size > 1:
                g = all_reduce(g, self.dp) / self.dp.size
            grads.append(g)
        if self.dp.size > 1:
            loss = all_reduce(loss, self.dp) / self.dp.size
        sq_split = ops.zeros((), ms.float32)
        sq_repl = ops.zeros((), ms.float32)
        for i in range(n):
            if not self.in_norm[i]:
                continue
            if self.tp_split[i]:
                sq_split = sq_split + (grads[i] * grads[i]).sum()
            else:
                sq_repl = sq_repl + (grads[i] * grads[i]).sum()
        if self.tp.size > 1:
            sq_split = all_reduce(sq_split, self.tp)
        sq = sq_split + sq_repl
        if self.pp.size > 1:
            sq = all_reduce(sq, self.pp)
        norm = ops.sqrt(sq)
        coef = ops.ones((), ms.float32)
        if self.clip > 0:
            coef = ops.minimum(coef, self.clip / (norm + 1e-6))
        ok = ops.isfinite(norm)  # [] bool; used only with skip_nonfinite
        for i in range(n):
            g = grads[i] * coef
            m = self.b1 * self.m[i] + (1.0 - self.b1) * g
            v = self.b2 * self.v[i] + (1.0 - self.b2) * g * g
            w = self.params[i]
            if self.decay[i]:
                w = w - lr * self.wd * w
            w = w - lr * (m / bc1) / (ops.sqrt(v / bc2) + self.eps)
            if self.skip_nonfinite:  # an overflowed step changes nothing
                m = ops.select(ok, m, self.m[i])
                v = ops.select(ok, v, self.v[i])
                w = ops.select(ok, w, self.params[i])
            ops.assign(self.m[i], m)
            ops.assign(self.v[i], v)
            ops.assign(self.params[i], w)
            ops.assign(self.acc[i], ops.zeros(g.shape, ms.float32))
        return norm, loss


class TrainState:
    """Weights and Adam moments of ``self.named`` ((name, Parameter) pairs) and
    ``self.update`` (an ``AdamWUpdate``), as numpy arrays for checkpoints: ``model_state()``,
    ``state_dict()`` (moments named ``adam_m.<param>`` / ``adam_v.<param>``; the step count lives
    with the caller), ``load(model_state, optimizer_state)`` (before the first step: compiled
    graphs do not see ``set_data``), ``shapes()``."""

    named: list
    update: AdamWUpdate

    def model_state(self) -> dict[str, np.ndarray]:
        return {n: p.asnumpy().copy() for n, p in self.named}  # asnumpy() aliases the buffer

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {}
        for (n, _), m, v in zip(self.named, self.update.m, self.update.v):
            out[f"adam_m.{n}"], out[f"adam_v.{n}"] = m.asnumpy().copy(), v.asnumpy().copy()
        return out

    def load(self, model_state: dict, optimizer_state: dict) -> None:
        """Restore weights and moments saved by ``model_state`` / ``state_dict``."""
        for (n, p), m, v in zip(self.named, self.update.m, self.update.v):
            p.set_data(ms.Tensor(model_state[n], ms.float32))
            m.set_data(ms.Tensor(optimizer_state[f"adam_m.{n}"], ms.float32))
            v.set_data(ms.Tensor(optimizer_state[f"adam_v.{n}"], ms.float32))

    def shapes(self) -> tuple[dict, dict]:
        """Expected ``(model, optimizer)`` tensor shapes for ``load_checkpoint``."""
        model = {n: tuple(p.shape) for n, p in self.named}
        optim = {f"adam_{k}.{n}": s for n, s in model.items() for k in ("m", "v")}
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
        split = tp_split_names(model)
        decay = [should_decay(n, len(p.shape)) for n, p in self.named]
        self.loss_cell = LossCell(model)
        self.forward_backward = ForwardBackward(self.loss_cell, self.params, self.acc,
                                                self.loss_scale)
        self.update = AdamWUpdate(self.params, self.acc, decay, [n in split for n, _ in self.named],
                                  dims, opt_cfg,
                                  skip_nonfinite=bool(self.cast_cells) or self.loss_scale != 1.0)

    def __call__(self, micro_batches, lr: float, step: int) -> tuple[float, float]:
        """One optimizer step (``step`` 0-based). ``micro_batches``: ``n`` (inputs, labels) numpy
        int32 pairs. Returns ``(loss, grad_norm)``: loss averaged over micro-batches and dp."""
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"got {len(micro_batches)} micro-batches, expected grad_accum_steps="
                             f"{self.n_micro}")
        scale = ms.Tensor(1.0 / self.n_micro, ms.float32)
        total = 0.0
        for inputs, labels in micro_batches:
            loss = self.forward_backward(ms.Tensor(inputs, ms.int32), ms.Tensor(labels, ms.int32), scale)
            total += float(loss.asnumpy())
        t = step + 1
        bc1, bc2 = 1.0 - self.opt.beta1 ** t, 1.0 - self.opt.beta2 ** t
        norm, loss = self.update(ms.Tensor(lr, ms.float32), ms.Tensor(bc1, ms.float32),
                                 ms.Tensor(bc2, ms.float32), ms.Tensor(total / self.n_micro, ms.float32))
        return float(loss.asnumpy()), float(norm.asnumpy())

    def evaluate(self, batches) -> float:
        """Mean loss over ``batches`` ((inputs, labels) pairs) on this rank, then over dp."""
        return mean_loss(self.loss_cell, batches, self.dims.dp)
