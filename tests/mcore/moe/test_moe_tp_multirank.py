"""MoELayer with tensor parallelism on 2 real ranks (one launch, ``_worker``), forward and
backward against the one-process layer on the same tokens:

- ``tp2_etp2``: tp = etp on the same ranks (tokens stay whole, expert weights split);
- ``tp2``: tp = 2, etp = 1 (each tp rank dispatches half the tokens, experts replicated:
  their gradients add up over the two ranks, the edp group);
- ``etp2``: tp = 1 (the ranks hold different tokens, dense dp = 2), etp = 2 (tokens gathered
  over etp, expert weights split);
- ``tp2_ep2``: tp = 2 and ep = 2 on the same ranks, etp = 1.

Each dropless (all router losses on) and with capacity padding (all-to-all dispatcher), and
with a sigmoid-gated shared expert (a tp MLP; all-gather dispatcher; 5 tokens, not a multiple
of tp); two scenarios also
dropless with the all-gather dispatcher under ``mindspore.jit``. Checked:
outputs, input gradients, router / shared expert / gate gradients (tp shards: this rank's
slice), expert gradients (this rank's ep and etp slice of the sum over every token batch that
reaches it; summed over edp first).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.mcore.moe.test_moe_multirank import _layer, _value_and_grads, _x

pytestmark = pytest.mark.multirank

H, E, F = 8, 4, 6
SCENARIOS = ("tp2_etp2", "tp2", "etp2", "tp2_ep2")
CASES = (("AllToAllDispatcher", "dropless"), ("AllToAllDispatcher", "padded"),
         ("AllGatherDispatcher", "shared"))
JIT = ("tp2_ep2", "etp2")  # the all-gather dispatcher, dropless


def _moe(tag):
    from mcore.moe.config import MoEConfig

    if tag == "padded":
        return MoEConfig(num_experts=E, top_k=2, ffn_hidden_size=F, capacity_factor=0.75,
                         pad_to_capacity=True, aux_loss_coeff=0.01)
    if tag == "shared":
        return MoEConfig(num_experts=E, top_k=1, ffn_hidden_size=F, score_function="sigmoid",
                         normalize_topk=True, shared_ffn_hidden_size=4, shared_expert_gate=True)
    return MoEConfig(num_experts=E, top_k=2, ffn_hidden_size=F, aux_loss_coeff=0.01,
                     seq_aux_loss_coeff=0.01, z_loss_coeff=1e-3)


def _groups(world, scenario):
    """(ModelGroups, edp group, data index of this rank's tokens) for ``scenario``."""
    import dataclasses

    from mcore.parallel_state import ModelGroups, ProcessGroup

    def on(kind):
        return dataclasses.replace(world, kind=kind)

    alone = ProcessGroup.single("edp", world.global_rank)
    if scenario == "tp2_etp2":
        return ModelGroups(tp=on("tp"), etp=on("etp")), alone, 0
    if scenario == "tp2":
        return ModelGroups(tp=on("tp")), on("edp"), 0
    if scenario == "etp2":
        return ModelGroups(etp=on("etp")), alone, world.rank
    return ModelGroups(tp=on("tp"), ep=on("ep")), alone, 0


def _cols(a, group, gated):
    """``group``'s rank's slice of the last dim (gate and up halves separately when gated)."""
    P, r = group.size, group.rank
    halves = np.split(a, 2, -1) if gated else [a]
    return np.concatenate([np.split(h, P, -1)[r] for h in halves], -1)


def _expected(pname, ref, groups):
    """This rank's part of the one-process gradient ``ref`` of parameter ``pname``."""
    tp, ep, etp = groups.tp, groups.ep, groups.etp
    if pname.startswith("experts."):
        per = E // ep.size
        ref = ref[ep.rank * per:(ep.rank + 1) * per]  # [E, ..] -> [E/ep, ..]
        if pname == "experts.fc1":
            return _cols(ref, etp, gated=True)  # [El, h, 2f] -> [El, h, 2f/etp]
        return np.split(ref, etp.size, 1)[etp.rank]  # [El, f, h] -> [El, f/etp, h]
    if pname.startswith("shared_experts.linear_fc1"):  # [2f, h] rows [gate; up] -> [gate_r; up_r]
        return _cols(ref.T, tp, gated=True).T
    if pname.startswith("shared_experts.linear_fc2"):  # [h, f] -> [h, f/tp]
        return np.split(ref, tp.size, 1)[tp.rank]
    return ref  # router, shared gate: replicated


def _check(ctx, world, scenario, name, tag, jit=False):
    import mindspore as ms

    from mcore.comm import all_reduce
    from mcore.moe.groups import MoEGroups

    groups, edp, d = _groups(world, scenario)
    data = [0, 1] if scenario == "etp2" else [0]  # the token batches held by the ranks
    shape = (1, 5, H) if tag == "shared" else (2, 4, H)  # 5 tokens: padded to split over tp
    xs = {q: _x(q, shape, salt=4) for q in data}
    gs = {q: _x(q, shape, salt=5) for q in data}
    moe = _moe(tag)
    single = _layer(moe, MoEGroups.single(), name)
    refs = {q: _value_and_grads(single, xs[q], gs[q]) for q in data}
    layer = _layer(moe, groups, name)
    with ctx.check(f"{scenario}_{name}_{tag}{'_jit' if jit else ''}"):
        y, dx, dw = _value_and_grads(layer, xs[d], gs[d], ms.jit if jit else None)
        y_ref, dx_ref, dw_ref = refs[d]
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-6)
        assert set(dw) == set(dw_ref), (sorted(dw), sorted(dw_ref))
        for pname, grad in dw.items():
            if pname.startswith("experts."):
                grad = all_reduce(ms.Tensor(grad), edp).asnumpy() if edp.size > 1 else grad
                ref = sum(refs[q][2][pname] for q in data)
                assert np.abs(grad).max() > 0, pname
            else:
                ref = dw_ref[pname]
            np.testing.assert_allclose(grad, _expected(pname, ref, groups), rtol=1e-4,
                                       atol=1e-6, err_msg=pname)


def _worker(ctx):
    from mcore.parallel_state import ParallelDims

    world = ParallelDims.build(tp=2).tp  # the two ranks, one group
    for scenario in SCENARIOS:
        for name, tag in CASES:
            _check(ctx, world, scenario, name, tag)
    for scenario in JIT:
        _check(ctx, world, scenario, "AllGatherDispatcher", "dropless", jit=True)


@pytest.fixture(scope="module")
def job():
    from tests.multirank import run_ranks

    return run_ranks(2, "tests.mcore.moe.test_moe_tp_multirank:_worker", timeout=600)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name,tag", CASES)
def test_tp_etp_layer_equals_one_process(job, scenario, name, tag):
    job.assert_ok(f"{scenario}_{name}_{tag}")


@pytest.mark.parametrize("scenario", JIT)
def test_tp_etp_allgather_layer_under_jit(job, scenario):
    job.assert_ok(f"{scenario}_AllGatherDispatcher_dropless_jit")
