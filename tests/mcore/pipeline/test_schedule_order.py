"""Schedule orders against hand-written textbook orders, and the communication plans they lower
to: matched, deadlock-free, within the 1F1B memory bound (pure Python, fast)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mcore.pipeline_parallel.comm_plan import Exchange, Msg, build_plans, simulate
from mcore.pipeline_parallel.schedule_order import (Action, format_order, inflight_bound,
                                                     interleaved_order, one_f_one_b_order,
                                                     parse_order, peak_inflight, schedule_orders)

# (pp, vpp, m) -> order of every rank, written out by hand from the textbook pictures
# (Narayanan et al. 2021, figures 3 and 4): warmup | steady 1F1B | cooldown.
TEXTBOOK = {
    (2, 1, 3): ["F0 F1 | B0 F2 B1 | B2",
                "F0 B0 F1 B1 F2 B2"],
    (3, 1, 2): ["F0 F1 | B0 B1",            # m < pp: all warmup
                "F0 F1 | B0 B1",
                "F0 B0 F1 B1"],
    (4, 1, 8): ["F0 F1 F2 | F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 | B5 B6 B7",
                "F0 F1 | F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 | B6 B7",
                "F0 | F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 | B7",
                "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"],
    (2, 2, 2): ["F0 F1 F0c1 F1c1 | B0c1 B1c1 B0 B1",   # m == pp: all warmup
                "F0 F1 F0c1 F1c1 | B0c1 B1c1 B0 B1"],
    (2, 2, 4): ["F0 F1 F0c1 F1c1 | F2 B0c1 F3 B1c1 F2c1 B0 F3c1 B1 | B2c1 B3c1 B2 B3",
                "F0 F1 | F0c1 B0c1 F1c1 B1c1 F2 B0 F3 B1 F2c1 B2c1 F3c1 B3c1 | B2 B3"],
    (4, 2, 8): ["F0 F1 F2 F3 F0c1 F1c1 F2c1 F3c1 F4 F5 | F6 B0c1 F7 B1c1 F4c1 B2c1 F5c1 B3c1 "
                "F6c1 B0 F7c1 B1 | B2 B3 B4c1 B5c1 B6c1 B7c1 B4 B5 B6 B7",
                None, None,
                "F0 F1 F2 F3 | F0c1 B0c1 F1c1 B1c1 F2c1 B2c1 F3c1 B3c1 F4 B0 F5 B1 F6 B2 F7 B3 "
                "F4c1 B4c1 F5c1 B5c1 F6c1 B6c1 F7c1 B7c1 | B4 B5 B6 B7"],
}


@pytest.mark.parametrize("key", list(TEXTBOOK), ids=lambda k: "pp%d_vpp%d_m%d" % k)
def test_orders_match_textbook(key):
    pp, vpp, m = key
    orders = schedule_orders(pp, vpp, m)
    for rank, text in enumerate(TEXTBOOK[key]):
        if text is not None:
            assert format_order(orders[rank]) == text.replace("| ", ""), f"rank {rank}"


def test_no_pipelining_and_forward_only():
    assert format_order(schedule_orders(1, 1, 3)[0]) == "F0 B0 F1 B1 F2 B2"
    assert format_order(one_f_one_b_order(4, 0, 3, forward_only=True)) == "F0 F1 F2"
    assert format_order(interleaved_order(2, 2, 1, 4, forward_only=True)) == \
        "F0 F1 F0c1 F1c1 F2 F3 F2c1 F3c1"
    assert parse_order("F0 F1c1 B0c1") == [Action("F", 0), Action("F", 1, 1), Action("B", 0, 1)]


@pytest.mark.parametrize("pp, vpp, m, message", [
    (4, 2, 6, "num_microbatches (6) divisible by pp size (4)"),
    (1, 2, 4, "vpp size (2) > 1 needs pp size > 1"),
    (2, 1, 0, "num_microbatches must be a positive int"),
])
def test_bad_sizes_name_the_culprit(pp, vpp, m, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        schedule_orders(pp, vpp, m)


def test_plan_of_two_stages_is_megatron_pattern():
    """Stage 0 of pp=2, m=3: send_forward twice, recv_backward, then send_forward_recv_backward."""
    plan = build_plans(schedule_orders(2, 1, 3))[0]
    act, grad = (lambda mb: Msg("act", mb, 0)), (lambda mb: Msg("grad", mb, 1))
    assert plan == [Action("F", 0), Exchange(1, (act(0),), ()), Action("F", 1),
                    Exchange(1, (act(1),), ()), Exchange(1, (), (grad(0),)), Action("B", 0),
                    Action("F", 2), Exchange(1, (act(2),), (grad(1),)), Action("B", 1),
                    Exchange(1, (), (grad(2),)), Action("B", 2)]


def test_simulator_catches_deadlock_and_mismatch():
    plans = build_plans(schedule_orders(2, 1, 2))
    swapped = [plans[0], plans[1][:]]
    i = next(k for k, s in enumerate(swapped[1]) if isinstance(s, Exchange))
    j = next(k for k, s in enumerate(swapped[1]) if isinstance(s, Action) and k > i)
    swapped[1][i], swapped[1][j] = swapped[1][j], swapped[1][i]   # compute before its input
    with pytest.raises(ValueError, match="before receiving"):
        simulate(swapped)
    broken = [plans[0], [Exchange(0, (), (Msg("act", 1, 0),))] + plans[1][1:]]  # wrong micro-batch
    with pytest.raises(ValueError, match="mismatched"):
        simulate(broken)
    with pytest.raises(ValueError, match="cannot complete"):
        build_plans([parse_order("B0 F0"), parse_order("F0 B0")])


@settings(max_examples=60, deadline=None)
@given(pp=st.integers(1, 5), vpp=st.integers(1, 3), groups=st.integers(1, 4),
       forward_only=st.booleans())
def test_every_schedule_is_complete_matched_deadlock_free_and_bounded(pp, vpp, groups,
                                                                      forward_only):
    if pp == 1:
        vpp = 1
    m = groups * pp if vpp > 1 else groups + pp - 2 + (pp == 1)
    orders = schedule_orders(pp, vpp, m, forward_only)
    for rank, order in enumerate(orders):
        kinds = "F" if forward_only else "FB"
        assert sorted(order) == sorted(Action(k, mb, c) for k in kinds for mb in range(m)
                                       for c in range(vpp)), f"rank {rank}: not each action once"
        for c in range(vpp):  # each chunk runs its micro-batches in order, F before B
            fs = [a.microbatch for a in order if a.chunk == c and a.kind == "F"]
            assert fs == sorted(fs)
        if not forward_only:
            assert peak_inflight(order) == inflight_bound(pp, vpp, rank, m) <= m * vpp
    sim = simulate(build_plans(orders, vpp), vpp)   # raises on deadlock / mismatch
    assert sim.peak_inflight == [peak_inflight(o) for o in orders]
