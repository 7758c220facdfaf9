"""Gradient finalisation: what happens to every parameter's gradient between the backward pass
and the optimizer (Megatron's ``finalize_model_grads``), in one place for every step.

    plans = grad_plans(named_params, tp_split_names, dims)
    grads = sum_tied_grads(grads, plans, dims)      # eager, pipeline only (see below)
    finalize = GradFinalizer(plans, dims)           # an nn.Cell, called inside the compiled update
    grads, norm = finalize(grads)                   # reduced gradients, global norm before clipping

What each parameter gets is decided by what it carries (``GradPlan``, built once):

- every gradient is the gradient of THIS rank's loss (mean over its micro-batches and, with
  context parallelism, over its ``s / cp`` tokens of each sequence). The global loss is the mean
  over the ``D = dp x cp`` ranks of the ``dp_cp`` group (with cp = 1 that is the dp group), so
  every gradient ends as a sum over the ranks holding a copy of the parameter, times ``1 / D``:
  - dense parameters: ``sum over dp_cp`` (copies live on the dp and cp ranks; a cp rank's
    gradient holds only its tokens' share, the attention backward having returned the key /
    value gradients to the ranks that computed them), ``/ D``;
  - expert parameters (``param.expert``): ``sum over edp / D``. The expert's owner already
    holds the sum over its ep group of the ep ranks' contributions (the dispatcher's backward
    brings them back), and ``ep x edp`` ranks together are the ``dp`` ranks of one tp / pp
    position, so the result is again the mean over dp (Megatron's
    ``expert_gradient_scaling_factor`` without ``average_in_collective``);
- sequence-parallel replicated parameters (``param.sequence_parallel``: norm weights, the bias
  of a sequence-parallel row-parallel layer) saw only this rank's part of the sequence: their
  gradient is summed over tp;
- a tied embedding's two copies (``param.shared_embedding``: the first pipeline stage's
  embedding and the last stage's head) are summed over the embedding group. That sum runs
  EAGERLY (``sum_tied_grads``): the first and the last stage compile different graphs, and a
  collective on a shared group inside both could run at different points of their collective
  sequences (docs/MINDSPORE_JIT_NOTES.md). With pp = 1 the two are one Parameter: nothing to do.

The global norm (``mcore.distributed.grad_norm.GlobalGradNorm``) counts every parameter once;
see that module. All collectives of ``GradFinalizer`` run in the same order on every rank of a
stage (same parameter list structure): one per parameter on dp or edp, then the tp sums of the
sequence-parallel ones, then the norm's.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import nn

from mcore.comm.collectives import all_reduce
from mcore.distributed.grad_norm import GlobalGradNorm
from mcore.parallel_state import ParallelDims


@dataclass(frozen=True)
class GradPlan:
    """How one parameter's gradient is finalised.

    ``reduce``: the group its copies live on, ``"dp"`` (dense) or ``"edp"`` (expert);
    ``"dp"`` stands for the ``dp_cp`` group (dp x cp; the dp group when cp = 1);
    ``sp_sum``: summed over tp (sequence-parallel replicated); ``tied``: summed over the
    embedding group (eagerly); ``norm``: its bucket in the global norm, ``"local"`` (replicated:
    counted on every rank, once), ``"tp"`` (split over tp), ``"expert"`` (split over ep),
    ``"expert_etp"`` (split over ep and etp) or ``None`` (left out: the head copy of a tied
    embedding, whose twin on the first stage is counted)."""

    name: str
    reduce: str = "dp"
    sp_sum: bool = False
    tied: bool = False
    norm: str | None = "local"


def grad_plan(name: str, param, tp_split: bool, dims: ParallelDims) -> GradPlan:
    """The ``GradPlan`` of ``param`` (named ``name``), from its attributes ``expert``,
    ``sequence_parallel`` and ``shared_embedding`` and whether it is split over tp
    (``tp_split``: for an expert, over etp). Raises ``ValueError`` naming the parameter for a
    combination that has no meaning (a sequence-parallel parameter that is also split)."""
    expert = bool(getattr(param, "expert", False))
    sp = bool(getattr(param, "sequence_parallel", False))
    tied = bool(getattr(param, "shared_embedding", False))
    if sp and (tp_split or expert):
        raise ValueError(f"parameter {name}: sequence_parallel marks a tp-replicated dense "
                         f"parameter, but it is {'an expert' if expert else 'split over tp'}")
    if expert:
        norm = "expert_etp" if tp_split else "expert"
    else:
        norm = "tp" if tp_split else "local"
    if tied and dims.pp.rank != 0:
        norm = None  # the head copy: the first stage counts the tied weight
    return GradPlan(name, "edp" if expert else "dp", sp, tied, norm)


def grad_plans(named_params, tp_split_names: set[str], dims: ParallelDims) -> list[GradPlan]:
    """``grad_plan`` for each ``(name, Parameter)`` of ``named_params`` (their order)."""
    return [grad_plan(n, p, n in tp_split_names, dims) for n, p in named_params]


def sum_tied_grads(grads, plans: list[GradPlan], dims: ParallelDims) -> list:
    """Eagerly sum the gradients of tied-embedding copies over the embedding group (the others
    are returned as they are). Call it on every rank with the same plans it compiled with: the
    first and the last stage each make one all-reduce per tied parameter, a middle stage none."""
    if len(grads) != len(plans):
        raise ValueError(f"sum_tied_grads: {len(grads)} gradients for {len(plans)} plans")
    return [all_reduce(g, dims.embedding) if plan.tied else g for g, plan in zip(grads, plans)]


class GradFinalizer(nn.Cell):
    """``construct(grads) -> (grads, norm)``: each gradient reduced as its ``GradPlan`` says
    (``sum_tied_grads`` excepted: that one is eager), and the global norm of the reduced
    gradients (fp32 scalar, before any clipping). ``grads``: a tuple (or ParameterTuple) aligned
    with ``plans``. ``changed[i]``: whether gradient ``i`` comes back as a new tensor (reduced
    or scaled), not ``grads[i]`` itself. Compiles inside the caller's graph
    (``training.adamw.AdamWUpdate``)."""

    def __init__(self, plans: list[GradPlan], dims: ParallelDims):
        super().__init__()
        self.plans = list(plans)
        self.on_edp = tuple(p.reduce == "edp" for p in plans)
        self.sp_sum = tuple(p.sp_sum for p in plans)
        self.dp, self.edp, self.tp = dims.dp_cp, dims.edp, dims.tp  # dp_cp: dp x cp ranks
        self.norm = GlobalGradNorm([p.norm for p in plans], dims)
        # per gradient: whether construct returns a new tensor (else grads[i] itself)
        self.changed = tuple((p.reduce == "edp" and dims.edp.size > 1) or dims.dp_cp.size > 1
                             or (p.sp_sum and dims.tp.size > 1) for p in plans)

    def construct(self, grads):
        out = []
        for i in range(len(self.on_edp)):
            g = grads[i]
            group = self.edp if self.on_edp[i] else self.dp
            if group.size > 1:
                g = all_reduce(g, group)
            if self.dp.size > 1:
                g = g / self.dp.size
            out.append(g)
        if self.tp.size > 1:
            for i in range(len(self.sp_sum)):
                if self.sp_sum[i]:
                    out[i] = all_reduce(out[i], self.tp)
        return tuple(out), self.norm(out)
