"""The AdamW update of ``training.step.TrainStep`` and ``PipelineTrainStep``, in place.

    update = AdamWUpdate(params, acc, decay, plans, dims, opt_cfg)
    norm, loss = update(lr, bc1, bc2, loss)      # tensors; bc1 = 1 - b1^t, bc2 = 1 - b2^t

Small compiled graphs (one host read between them, of the norm that is returned anyway):

1. ``FinalizeGrads(loss) -> (norm, loss, coef)``: ``g, norm = GradFinalizer(acc)`` (dp / edp
   mean, sequence-parallel sums, global norm; ``mcore.distributed.finalize``), the clip factor
   ``coef = min(1, clip / (norm + 1e-6))`` (1 when ``clip <= 0``), the loss averaged over dp.
2. If both are finite, ``ApplyAdamW(lr', eps', wd', coef)``, which by the ``adamw`` op of
   ``mcore.fusions`` (chosen when the update is built) is either

   - the CPU kernel (``mcore.fusions.optimizer_ops.CpuAdamW``): one pass per parameter that
     reads ``w, g, m, v``, applies ``coef`` to ``g``, writes ``w, m, v`` in place and zeroes
     ``g``. ``FinalizeGrads`` then writes ``acc = g`` only for the gradients the finaliser
     changed (dp > 1, sequence-parallel sums); with one process it writes nothing; or
   - the composed reference: ``FinalizeGrads`` writes ``acc = g * coef`` for every parameter,
     then MindSpore's in-place ``ops.AdamWeightDecay`` per parameter, then ``acc = 0``.

   Both compute ``m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); w -= lr' (m / (sqrt(v) + eps')
   + wd' w)``; with ``lr' = lr sqrt(bc2) / bc1``, ``eps' = eps sqrt(bc2)`` and
   ``wd' = wd bc1 / sqrt(bc2)`` (0 where ``should_decay`` is false) that is exactly AdamW with
   bias correction and decoupled decay::

       w = w - lr wd w - lr (m / bc1) / (sqrt(v / bc2) + eps)

3. Otherwise (a skipped step) ``ZeroGrads``: weights and moments keep their values, ``acc = 0``.

Why not elementwise ops in one graph: on the CPU every intermediate of a compiled graph keeps its
own buffer for the life of the graph, so ``m``, ``v``, ``w`` written out as ~15 elementwise ops
per parameter held ~6 GB for the 44M-parameter benchmark model (docs/performance.md); both
paths update ``w``, ``m``, ``v`` where they are and need no temporaries.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops

from mcore.comm.collectives import all_reduce
from mcore.distributed.finalize import GradFinalizer
from mcore.fusions.registry import fused_cell
from mcore.parallel_state import ParallelDims


class FinalizeGrads(nn.Cell):
    """``construct(loss) -> (norm, loss over dp, coef)``; writes the finalised gradients into
    ``acc``: times ``coef`` for every parameter when ``scale_in_place`` (the composed update),
    else as they are and only where the finaliser changed them (the kernel applies ``coef``)."""

    def __init__(self, acc, plans: list, dims: ParallelDims, clip: float, scale_in_place: bool):
        super().__init__()
        self.acc, self.finalize, self.clip = acc, GradFinalizer(plans, dims), clip
        self.dp = dims.dp_cp  # the loss is averaged over dp x cp (dp when cp = 1)
        self.write = tuple(scale_in_place or c for c in self.finalize.changed)
        self.scale_in_place = scale_in_place

    def construct(self, loss):
        grads, norm = self.finalize(self.acc)
        if self.dp.size > 1:
            loss = all_reduce(loss, self.dp) / self.dp.size
        coef = ops.ones((), ms.float32)
        if self.clip > 0:
            coef = ops.minimum(coef, self.clip / (norm + 1e-6))
        for i in range(len(self.acc)):
            if self.write[i]:
                ops.assign(self.acc[i], grads[i] * coef if self.scale_in_place else grads[i])
        return norm, loss, coef


class ZeroGrads(nn.Cell):
    """``acc = 0`` for every buffer."""

    def __init__(self, acc):
        super().__init__()
        self.acc = acc

    def construct(self):
        for i in range(len(self.acc)):
            ops.assign(self.acc[i], ops.zeros(self.acc[i].shape, ms.float32))
        return ops.zeros((), ms.float32)


class ApplyAdamW(nn.Cell):
    """AdamW in place on every parameter from the gradients in ``acc``, then ``acc = 0``:
    ``construct(lr', eps', wd', coef) -> 0`` (a scalar to wait on). ``kernel``: the ``adamw``
    CPU kernel (``coef`` applied to the gradient inside it), or None for the composed reference
    (``ops.AdamWeightDecay``; ``acc`` already holds ``g * coef``, ``coef`` is unused)."""

    def __init__(self, params, acc, m, v, decay: list[bool], b1: float, b2: float, kernel=None):
        super().__init__()
        self.params, self.acc, self.m, self.v = params, acc, m, v
        self.decay = tuple(decay)
        self.kernel, self.fused = kernel, kernel is not None
        self.adam = ops.AdamWeightDecay()
        self.b1, self.b2 = ms.Tensor(b1, ms.float32), ms.Tensor(b2, ms.float32)
        self.zero_grads = ZeroGrads(acc)

    def construct(self, lr, eps, wd, coef):
        no_decay = ops.zeros((), ms.float32)
        if self.fused:  # (lr, b1, b2, eps, wd, coef) per kernel call
            with_wd = ops.stack([lr, self.b1, self.b2, eps, wd, coef])
            without = ops.stack([lr, self.b1, self.b2, eps, no_decay, coef])
            done = []
            for i in range(len(self.params)):
                done.append(self.kernel(self.params[i], self.acc[i], self.m[i], self.v[i],
                                        with_wd if self.decay[i] else without))
            return ops.cat(done).sum()  # [n] -> []: keeps every call in the graph
        for i in range(len(self.params)):
            self.adam(self.params[i], self.m[i], self.v[i], lr, self.b1, self.b2, eps,
                      wd if self.decay[i] else no_decay, self.acc[i])
        return self.zero_grads()


def _moments(params, kind: str):
    return ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"adam_{kind}.{p.name}")
                           for p in params])


class AdamWUpdate:
    """Finalise, clip, AdamW in place, zero the buffers; see the module docstring.

    ``params``, ``acc``: ParameterTuples (weights, fp32 gradient buffers); ``decay``: per
    parameter, whether weight decay applies; ``plans``: one ``GradPlan`` per parameter
    (``mcore.distributed.finalize.grad_plans``). ``__call__(lr, bc1, bc2, loss)`` (fp32 scalar
    tensors; ``loss``: this rank's mean loss) returns ``(grad_norm, loss over dp)`` as tensors,
    the norm measured before clipping. Unless both are finite, weights and moments keep their
    values. ``m``, ``v``: the moments (ParameterTuples named ``adam_m.<param>`` /
    ``adam_v.<param>``). ``fused``: whether the ``adamw`` kernel of ``mcore.fusions`` runs
    (chosen here, by the registry and ``$MSFORMERS_FUSIONS``; float32 parameters only)."""

    sharded = False  # whole moments (mcore.distributed's DistributedAdamW shards them)

    def __init__(self, params, acc, decay: list[bool], plans: list, dims: ParallelDims, opt_cfg):
        kernel = fused_cell("adamw") if all(p.dtype == ms.float32 for p in params) else None
        self.fused = kernel is not None
        self.m, self.v = _moments(params, "m"), _moments(params, "v")
        self.finalize = FinalizeGrads(acc, plans, dims, float(opt_cfg.clip_grad),
                                      scale_in_place=not self.fused)
        self.apply = ApplyAdamW(params, acc, self.m, self.v, decay, float(opt_cfg.beta1),
                                float(opt_cfg.beta2), kernel)
        self.eps, self.wd = float(opt_cfg.eps), float(opt_cfg.weight_decay)
        self._graphs = (self.finalize, self.apply, self.apply.zero_grads)

    def jit(self) -> "AdamWUpdate":
        """Compile the three graphs with ``mindspore.jit`` (for callers running in PyNative,
        ``PipelineTrainStep``); returns ``self``."""
        self._graphs = tuple(ms.jit(cell) for cell in (self.finalize, self.apply, self.apply.zero_grads))
        return self

    def __call__(self, lr, bc1, bc2, loss):
        finalize, apply, zero_grads = self._graphs
        norm, loss, coef = finalize(loss)
        if not (math.isfinite(float(norm.asnumpy())) and math.isfinite(float(loss.asnumpy()))):
            zero_grads().asnumpy()  # a skipped step changes nothing but the buffers
            return norm, loss
        lr, bc1, bc2 = (float(x.asnumpy()) for x in (lr, bc1, bc2))
        root = math.sqrt(bc2)
        # wait for it: the kernel's in-place writes are invisible to MindSpore's scheduling
        apply(ms.Tensor(lr * root / bc1, ms.float32), ms.Tensor(self.eps * root, ms.float32),
              ms.Tensor(self.wd * bc1 / root, ms.float32), coef).asnumpy()
        return norm, loss


def compile_update(update):
    """``update`` compiled for a caller that runs in PyNative: ``AdamWUpdate.jit()``, or a Cell
    (``DistributedAdamW``) under ``mindspore.jit``."""
    return update.jit() if isinstance(update, AdamWUpdate) else ms.jit(update)
