"""The distributed optimizer (ZeRO-1): AdamW whose moments are split over the data-parallel group.

    update = DistributedAdamW(params, acc, decay, plans, dims, opt_cfg, bucket_size)
    norm, loss = update(lr, bc1, bc2, loss)       # same contract as training.step.AdamWUpdate

The parameters are laid into flat buckets sharded over the ``D = dp x cp`` ranks of the
``dp_cp`` group (as Megatron shards over its data-parallel group with context parallelism:
every one of those ranks holds a copy of the weights and its share of the gradient; with cp = 1
it is the dp group, and below "dp" means this group) (``mcore.distributed.buckets``); rank
``r`` of it owns shard ``r`` of every bucket: the
only copy of the AdamW moments of those elements, and the only rank that updates those weights.
One compiled graph, in this order (the same collectives, in the same order, on every rank):

1. per bucket: the accumulated gradients of its parameters (sequence-parallel ones first summed
   over tp, as ``GradFinalizer`` does) are concatenated, zero-padded and reduce-scattered over
   dp: ``g_shard = reduce_scatter_sum(flat, dp) / D`` -- the mean over dp of this rank's shard;
   the accumulation buffers are zeroed;
2. the global norm from the shards: each element sits in exactly one rank's shard, so the
   squares of a shard, summed over dp, count every element once; parameters split over tp are
   then summed over tp, replicated ones are not (``GradPlan.norm``: ``"local"`` / ``"tp"`` /
   ``None``, as ``mcore.distributed.grad_norm``), and the total over pp;
3. clip (``coef = min(1, clip / (norm + 1e-6))``) and AdamW on the shard, the same formulas as
   ``AdamWUpdate`` (decoupled decay on the elements of parameters ``should_decay`` selects);
   unless the loss and the norm are finite the shard keeps its weights and moments;
4. per bucket: the updated shards are all-gathered over dp and written into the parameters.

Every dp rank compiles the same graph: the shard is cut from whole-bucket buffers by a slice
whose offset is the only thing that depends on the rank (the weight-decay and norm masks too).
Graphs whose structure differed by rank (per-rank lists of pieces) were seen to run two
buckets' all-reduces in opposite orders on two ranks under ``mindspore.jit`` (pp > 1), which
pairs mismatched collectives (docs/MINDSPORE_JIT_NOTES.md).

Master weights: in this project parameters are always fp32 (``training.dtype`` only changes the
matmuls), so the parameters are the master weights, as for ``AdamWUpdate``: a rank reads its
shard from them and writes the all-gathered result back; no second copy is kept. Memory per
parameter element: 4 bytes of weight + 4 of gradient buffer + 8 / D of moments (16 without).

Not supported (``ValueError`` naming the parameter): expert parameters (their gradients are
reduced over edp, not dp), non-fp32 parameters. On CPU a reduce-scatter is a SUM all-reduce
followed by a slice and an all-gather a SUM all-reduce of a zero-padded buffer
(``mcore.comm.collectives``), so there the distributed optimizer saves memory, not traffic.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, nn, ops

from mcore.comm.collectives import all_gather, all_reduce, reduce_scatter
from mcore.distributed.buckets import DEFAULT_BUCKET_SIZE, bucket_layout
from mcore.parallel_state import ParallelDims


def _runs(bucket, flag) -> tuple:
    """A 0/1 mask over a whole padded bucket as ``((start, end, 1.0 | 0.0), ...)``: 1.0 on the
    elements of the parameters (by name) for which ``flag(name)`` holds, 0.0 elsewhere and on
    the padding; neighbouring parameters with the same value share one run."""
    runs = []
    for s in bucket.slots:
        value = 1.0 if flag(s.name) else 0.0
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], s.offset + s.numel, value)
        else:
            runs.append((s.offset, s.offset + s.numel, value))
    if bucket.padded > bucket.numel:
        runs.append((bucket.numel, bucket.padded, 0.0))
    return tuple(runs)


class DistributedAdamW(nn.Cell):
    """ZeRO-1 AdamW; see the module docstring. Arguments as ``training.step.AdamWUpdate``
    (``params``, ``acc``: ParameterTuples; ``decay``: per-parameter flags; ``plans``:
    ``GradPlan`` per parameter), plus ``bucket_size`` (elements)."""

    sharded = True

    def __init__(self, params, acc, decay: list[bool], plans: list, dims: ParallelDims, opt_cfg,
                 bucket_size: int = DEFAULT_BUCKET_SIZE):
        super().__init__()
        for p, plan in zip(params, plans):
            if plan.reduce != "dp":
                raise ValueError(f"parameter {plan.name}: the distributed optimizer does not "
                                 "handle expert parameters (reduced over edp)")
            if p.dtype != ms.float32:
                raise ValueError(f"parameter {plan.name}: the distributed optimizer needs fp32 "
                                 f"parameters (the master weights), got {p.dtype}")
        self.params, self.acc = params, acc
        self.names = [plan.name for plan in plans]
        # sharded over dp x cp (Megatron's data-parallel group with context parallelism): every
        # rank of dp_cp holds a copy of the weights; with cp = 1 this is the dp group
        self.dp, self.tp, self.pp = dims.dp_cp, dims.tp, dims.pp
        shapes = [(n, p.shape) for n, p in zip(self.names, params)]
        self.layout = bucket_layout(shapes, self.dp.size, bucket_size)
        self.pieces = self.layout.pieces(self.dp.rank)
        index = {n: i for i, n in enumerate(self.names)}
        # per bucket: [(param index, flat offset, numel, shape)], padding, shard size
        self.slots = tuple(tuple((index[s.name], s.offset, s.numel, s.shape) for s in b.slots)
                           for b in self.layout.buckets)
        self.pads = tuple(b.padded - b.numel for b in self.layout.buckets)
        self.shard_sizes = tuple(b.shard_size for b in self.layout.buckets)
        self.starts = tuple(self.dp.rank * b.shard_size for b in self.layout.buckets)
        norm_of = {plan.name: plan.norm for plan in plans}
        decay_of = dict(zip(self.names, decay))
        # Masks over each whole bucket, sliced to the shard in the graph: every dp rank compiles
        # the same graph (only slice offsets differ), so its collectives run in the same order.
        buckets = self.layout.buckets
        self.decay_runs = tuple(_runs(b, lambda n: decay_of[n]) for b in buckets)
        self.local_runs = tuple(_runs(b, lambda n: norm_of[n] == "local") for b in buckets)
        self.tp_runs = tuple(_runs(b, lambda n: norm_of[n] == "tp") for b in buckets)
        self.sp_sum = tuple(bool(plan.sp_sum) for plan in plans)
        self.sum_tp = dims.tp.size > 1 and any(plan.norm == "tp" for plan in plans)
        self.m = ParameterTuple([Parameter(ops.zeros((s,), ms.float32), name=f"zero_m.{b}",
                                           requires_grad=False)
                                 for b, s in enumerate(self.shard_sizes)])
        self.v = ParameterTuple([Parameter(ops.zeros((s,), ms.float32), name=f"zero_v.{b}",
                                           requires_grad=False)
                                 for b, s in enumerate(self.shard_sizes)])
        self.b1, self.b2, self.eps = float(opt_cfg.beta1), float(opt_cfg.beta2), float(opt_cfg.eps)
        self.wd, self.clip = float(opt_cfg.weight_decay), float(opt_cfg.clip_grad)

    def _flat_grad(self, b):
        """Bucket ``b``'s gradients, flat and zero-padded: [padded]."""
        parts = []
        for slot in self.slots[b]:
            i = slot[0]
            g = self.acc[i]
            if self.sp_sum[i] and self.tp.size > 1:
                g = all_reduce(g, self.tp)
            parts.append(g.reshape(-1))
        if self.pads[b]:
            parts.append(ops.zeros((self.pads[b],), ms.float32))
        return ops.cat(parts)

    def _own_weights(self, b):
        """This rank's shard of bucket ``b`` read from the parameters: [padded] -> [shard]."""
        parts = []
        for slot in self.slots[b]:
            parts.append(self.params[slot[0]].reshape(-1))
        if self.pads[b]:
            parts.append(ops.zeros((self.pads[b],), ms.float32))
        return ops.cat(parts)[self.starts[b]:self.starts[b] + self.shard_sizes[b]]

    def _mask(self, runs, b):
        """A 0/1 mask (``_runs``) over bucket ``b`` cut to this rank's shard: [shard] (built per
        step, not kept)."""
        parts = []
        for run in runs:  # (start, end, 1.0 | 0.0)
            parts.append(ops.fill(ms.float32, (run[1] - run[0],), run[2]))
        return ops.cat(parts)[self.starts[b]:self.starts[b] + self.shard_sizes[b]]

    def construct(self, lr, bc1, bc2, loss):
        nb = len(self.slots)
        grads = []
        for b in range(nb):
            flat = self._flat_grad(b)
            if self.dp.size > 1:
                flat = reduce_scatter(flat, self.dp) / self.dp.size  # [padded] -> [shard]
            grads.append(flat)
        local = ops.zeros((), ms.float32)
        split = ops.zeros((), ms.float32)
        for b in range(nb):
            sq = grads[b] * grads[b]
            local = local + (sq * self._mask(self.local_runs[b], b)).sum()
            split = split + (sq * self._mask(self.tp_runs[b], b)).sum()
        sums = ops.stack([local, split])  # [2]
        if self.dp.size > 1:
            sums = all_reduce(sums, self.dp)
            loss = all_reduce(loss, self.dp) / self.dp.size
        local, split = sums[0], sums[1]
        if self.sum_tp:
            split = all_reduce(split, self.tp)
        total = local + split
        if self.pp.size > 1:
            total = all_reduce(total, self.pp)
        norm = ops.sqrt(total)
        coef = ops.ones((), ms.float32)
        if self.clip > 0:
            coef = ops.minimum(coef, self.clip / (norm + 1e-6))
        ok = ops.logical_and(ops.isfinite(norm), ops.isfinite(loss))  # [] bool: update applied
        for b in range(nb):
            g = grads[b] * coef
            m = self.b1 * self.m[b] + (1.0 - self.b1) * g
            v = self.b2 * self.v[b] + (1.0 - self.b2) * g * g
            w0 = self._own_weights(b)
            w = w0 - lr * self.wd * w0 * self._mask(self.decay_runs[b], b)
            w = w - lr * (m / bc1) / (ops.sqrt(v / bc2) + self.eps)
            ops.assign(self.m[b], ops.select(ok, m, self.m[b]))  # a skipped step changes nothing
            ops.assign(self.v[b], ops.select(ok, v, self.v[b]))
            full = all_gather(ops.select(ok, w, w0), self.dp)  # [shard] -> [padded]
            for slot in self.slots[b]:  # (param index, offset, numel, shape)
                ops.assign(self.params[slot[0]], full[slot[1]:slot[1] + slot[2]].reshape(slot[3]))
                # zeroed last: an assign placed right after the reads in step 1 ran before them
                # in GRAPH_MODE (the reads go through reshape + concat)
                ops.assign(self.acc[slot[0]], ops.zeros(self.acc[slot[0]].shape, ms.float32))
        return norm, loss

    # ------------------------------------------------------------------ checkpoint state

    def shard_state(self) -> dict[str, np.ndarray]:
        """This rank's moments, per parameter piece: ``adam_m.<name>`` / ``adam_v.<name>`` (1-D,
        the piece's elements) and ``shard.<name>`` (int64 ``[param_offset, length, *global
        shape]``: the piece covers elements ``[param_offset, param_offset + length)`` of the
        row-major flattened parameter). A parameter with no element here has no entry."""
        m = [t.asnumpy() for t in self.m]
        v = [t.asnumpy() for t in self.v]
        out = {}
        for p in self.pieces:
            lo, hi = p.shard_offset, p.shard_offset + p.length
            out[f"adam_m.{p.name}"] = m[p.bucket][lo:hi].copy()
            out[f"adam_v.{p.name}"] = v[p.bucket][lo:hi].copy()
            out[f"shard.{p.name}"] = np.array([p.param_offset, p.length, *p.shape], np.int64)
        return out

    def load_full_moments(self, state: dict, in_place: bool = False) -> None:
        """Set this rank's moment shards from full-shape ``adam_m.<name>`` / ``adam_v.<name>``
        arrays (the non-distributed naming; ``mcore.checkpoint`` reads them in any layout).
        ``in_place``: write into the existing buffers (``ops.assign``), for a load after the
        update graph has been compiled."""
        for kind, tensors in (("m", self.m), ("v", self.v)):
            shards = [np.zeros(s, np.float32) for s in self.shard_sizes]
            for p in self.pieces:
                flat = np.asarray(state[f"adam_{kind}.{p.name}"], np.float32).reshape(-1)
                shards[p.bucket][p.shard_offset:p.shard_offset + p.length] = \
                    flat[p.param_offset:p.param_offset + p.length]
            for t, s in zip(tensors, shards):
                if in_place:  # compiled graphs keep their buffers: write into them
                    ops.assign(t, ms.Tensor(s, ms.float32))
                else:
                    t.set_data(ms.Tensor(s, ms.float32))
