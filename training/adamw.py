"""The AdamW update of ``training.step.TrainStep`` and ``PipelineTrainStep``, in place.

    update = AdamWUpdate(params, acc, decay, plans, dims, opt_cfg)
    norm, loss = update(lr, bc1, bc2, loss)      # tensors; bc1 = 1 - b1^t, bc2 = 1 - b2^t

Three small compiled graphs (one host read between them, of the norm that is returned anyway):

1. ``FinalizeGrads(loss)``: ``g, norm = GradFinalizer(acc)`` (dp / edp mean, sequence-parallel
   sums, global norm; ``mcore.distributed.finalize``), ``acc = g * min(1, clip / (norm + 1e-6))``
   written back in place (``clip > 0``), the loss averaged over dp. Returns ``(norm, loss)``.
2. If both are finite, ``ApplyAdamW(lr', eps', wd')``: MindSpore's fused in-place
   ``ops.AdamWeightDecay`` per parameter, then ``acc = 0``. Its kernel computes
   ``m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); w -= lr' (m / (sqrt(v) + eps') + wd' w)``;
   with ``lr' = lr sqrt(bc2) / bc1``, ``eps' = eps sqrt(bc2)`` and ``wd' = wd bc1 / sqrt(bc2)``
   (0 where ``should_decay`` is false) that is exactly AdamW with bias correction and decoupled
   decay::

       w = w - lr wd w - lr (m / bc1) / (sqrt(v / bc2) + eps)

3. Otherwise (a skipped step) ``ZeroGrads``: weights and moments keep their values, ``acc = 0``.

Why not elementwise ops in one graph: on the CPU every intermediate of a compiled graph keeps its
own buffer for the life of the graph, so ``m``, ``v``, ``w`` written out as ~15 elementwise ops
per parameter held ~6 GB for the 44M-parameter benchmark model (docs/performance.md); the fused
kernel updates ``w``, ``m``, ``v`` where they are and needs no temporaries.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops

from mcore.comm.collectives import all_reduce
from mcore.distributed.finalize import GradFinalizer
from mcore.parallel_state import ParallelDims


class FinalizeGrads(nn.Cell):
    """``acc <- clipped finalised gradients`` (in place); returns ``(norm, loss over dp)``."""

    def __init__(self, acc, plans: list, dims: ParallelDims, clip: float):
        super().__init__()
        self.acc, self.finalize, self.clip = acc, GradFinalizer(plans, dims), clip
        self.dp = dims.dp_cp  # the loss is averaged over dp x cp (dp when cp = 1)

    def construct(self, loss):
        grads, norm = self.finalize(self.acc)
        if self.dp.size > 1:
            loss = all_reduce(loss, self.dp) / self.dp.size
        coef = ops.ones((), ms.float32)
        if self.clip > 0:
            coef = ops.minimum(coef, self.clip / (norm + 1e-6))
        for i in range(len(self.acc)):
            ops.assign(self.acc[i], grads[i] * coef)
        return norm, loss


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
    """One in-place ``ops.AdamWeightDecay`` per parameter on ``acc``, then ``acc = 0``."""

    def __init__(self, params, acc, decay: list[bool], b1: float, b2: float):
        super().__init__()
        self.params, self.acc, self.decay = params, acc, tuple(decay)
        self.m = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"adam_m.{p.name}")
                                 for p in params])
        self.v = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"adam_v.{p.name}")
                                 for p in params])
        self.adam = ops.AdamWeightDecay()
        self.b1, self.b2 = ms.Tensor(b1, ms.float32), ms.Tensor(b2, ms.float32)
        self.zero_grads = ZeroGrads(acc)

    def construct(self, lr, eps, wd):
        no_decay = ops.zeros((), ms.float32)
        for i in range(len(self.params)):
            self.adam(self.params[i], self.m[i], self.v[i], lr, self.b1, self.b2, eps,
                      wd if self.decay[i] else no_decay, self.acc[i])
        return self.zero_grads()


class AdamWUpdate:
    """Finalise, clip, AdamW in place, zero the buffers; see the module docstring.

    ``params``, ``acc``: ParameterTuples (weights, fp32 gradient buffers); ``decay``: per
    parameter, whether weight decay applies; ``plans``: one ``GradPlan`` per parameter
    (``mcore.distributed.finalize.grad_plans``). ``__call__(lr, bc1, bc2, loss)`` (fp32 scalar
    tensors; ``loss``: this rank's mean loss) returns ``(grad_norm, loss over dp)`` as tensors,
    the norm measured before clipping. Unless both are finite, weights and moments keep their
    values. ``m``, ``v``: the moments (ParameterTuples named ``adam_m.<param>`` /
    ``adam_v.<param>``)."""

    sharded = False  # whole moments (mcore.distributed's DistributedAdamW shards them)

    def __init__(self, params, acc, decay: list[bool], plans: list, dims: ParallelDims, opt_cfg):
        self.finalize = FinalizeGrads(acc, plans, dims, float(opt_cfg.clip_grad))
        self.apply = ApplyAdamW(params, acc, decay, float(opt_cfg.beta1), float(opt_cfg.beta2))
        self.m, self.v = self.apply.m, self.apply.v
        self.eps, self.wd = float(opt_cfg.eps), float(opt_cfg.weight_decay)
        self._graphs = (self.finalize, self.apply, self.apply.zero_grads)

    def jit(self) -> "AdamWUpdate":
        """Compile the three graphs with ``mindspore.jit`` (for callers running in PyNative,
        ``PipelineTrainStep``); returns ``self``."""
        self._graphs = tuple(ms.jit(cell) for cell in (self.finalize, self.apply, self.apply.zero_grads))
        return self

    def __call__(self, lr, bc1, bc2, loss):
        finalize, apply, zero_grads = self._graphs
        norm, loss = finalize(loss)
        if not (math.isfinite(float(norm.asnumpy())) and math.isfinite(float(loss.asnumpy()))):
            zero_grads()  # a skipped step changes nothing but the buffers
            return norm, loss
        lr, bc1, bc2 = (float(x.asnumpy()) for x in (lr, bc1, bc2))
        root = math.sqrt(bc2)
        apply(ms.Tensor(lr * root / bc1, ms.float32), ms.Tensor(self.eps * root, ms.float32),
              ms.Tensor(self.wd * bc1 / root, ms.float32))
        return norm, loss


def compile_update(update):
    """``update`` compiled for a caller that runs in PyNative: ``AdamWUpdate.jit()``, or a Cell
    (``DistributedAdamW``) under ``mindspore.jit``."""
    return update.jit() if isinstance(update, AdamWUpdate) else ms.jit(update)
