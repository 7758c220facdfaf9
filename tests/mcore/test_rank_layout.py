"""Pure rank arithmetic: properties over many layouts, hand-checked tables, bad layouts."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcore.parallel_state import ParallelDims
from mcore.rank_layout import AXES, DEFAULT_ORDER, RankLayout


@st.composite
def layouts(draw):
    tp, cp, ep, pp, dp = (draw(st.sampled_from([1, 2, 3, 4])) for _ in range(5))
    world = tp * cp * pp * dp
    etp = draw(st.sampled_from([None, 1, tp]))
    # ep must divide world / (etp * pp)
    expert_room = world // ((tp if etp is None else etp) * pp)
    ep = ep if expert_room % ep == 0 else 1
    order = "-".join(draw(st.permutations(AXES)))
    return RankLayout(world=world, tp=tp, cp=cp, ep=ep, pp=pp, etp=etp, order=order)


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_every_rank_is_in_exactly_one_group_of_each_kind(layout):
    for kind, groups in layout.group_table().items():
        members = sorted(r for g in groups for r in g)
        assert members == list(range(layout.world)), kind


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_groups_have_the_axis_size(layout):
    table = layout.group_table()
    expect = {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "pp": layout.pp,
              "dp_cp": layout.dp * layout.cp, "tp_dp": layout.tp * layout.dp,
              "mp": layout.tp * layout.pp, "ep": layout.ep, "etp": layout.expert_tp,
              "edp": layout.expert_dp}
    for kind, size in expect.items():
        assert {len(g) for g in table[kind]} == {size}, kind


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_groups_of_different_axes_intersect_in_exactly_one_rank(layout):
    table = layout.group_table()
    for a, b in (("tp", "dp"), ("tp", "pp"), ("dp", "pp"), ("cp", "tp"), ("cp", "pp"),
                 ("etp", "ep"), ("ep", "edp")):
        for rank in range(layout.world):
            ga = next(g for g in table[a] if rank in g)
            gb = next(g for g in table[b] if rank in g)
            assert set(ga) & set(gb) == {rank}, (a, b, rank)


def test_megatron_table_world8_tp2_pp2():
    """Megatron-core's documented example: 8 ranks, tp=2, pp=2 -> dp=2 (order tp-cp-ep-dp-pp)."""
    t = RankLayout(world=8, tp=2, pp=2).group_table()
    assert t["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert t["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert t["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert t["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_megatron_table_world16_tp2_pp4():
    """The example of Megatron's initialize_model_parallel docstring (16 ranks, tp 2, pp 4)."""
    t = RankLayout(world=16, tp=2, pp=4).group_table()
    assert t["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert t["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert t["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert [0, 12] in t["embedding"] and [4] in t["embedding"]


def test_expert_grid_world8_tp2_ep2():
    t = RankLayout(world=8, tp=2, ep=2, etp=1).group_table()
    assert t["etp"] == [[r] for r in range(8)]
    assert t["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t["edp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert t["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_order_changes_the_layout():
    t = RankLayout(world=4, tp=2, order="dp-tp-cp-ep-pp").group_table()
    assert t["dp"] == [[0, 1], [2, 3]]
    assert t["tp"] == [[0, 2], [1, 3]]


def test_large_world_is_fast_and_consistent():
    layout = RankLayout(world=1024, tp=8, pp=4, cp=2, ep=4)
    dims = ParallelDims.from_layout(layout, 777)
    assert dims.dp.size == 16 and dims.tp.size == 8 and dims.ep.size == 4
    assert dims.tp.global_rank == 777 and 777 in dims.pp.ranks
    assert dims.pp_next in dims.pp.ranks and dims.pp_prev in dims.pp.ranks


def test_parallel_dims_single_process_has_only_size_one_groups():
    dims = ParallelDims.single()
    for kind in ("tp", "cp", "dp", "pp", "ep", "etp", "edp", "mp", "embedding", "world"):
        group = getattr(dims, kind)
        assert group.size == 1 and group.comm_name is None and group.rank == 0
    assert dims.is_first_stage and dims.is_last_stage


def test_pipeline_neighbours_form_a_ring():
    layout = RankLayout(world=8, tp=2, pp=4)
    for rank in range(8):
        d = ParallelDims.from_layout(layout, rank)
        assert d.pp_next == d.pp.ranks[(d.pp_stage + 1) % 4]
        assert set(d.pp_next_pair.ranks) == {rank, d.pp_next}


@pytest.mark.parametrize("kwargs, message", [
    (dict(world=8, tp=3), "world size 8 is not divisible by tp=3 * cp=1 * pp=1 = 3"),
    (dict(world=8, tp=2, pp=3), "world size 8 is not divisible by tp=2 * cp=1 * pp=3 = 6"),
    (dict(world=8, tp=2, ep=3), "world size 8 is not divisible by etp=2 * ep=3 * pp=1 = 6"),
    (dict(world=4, tp=0), "tp must be a positive integer, got 0"),
    (dict(world=4, order="tp-cp-ep-dp-xx"), "unknown axis 'xx'"),
    (dict(world=4, order="tp-tp-ep-dp-pp"), "axis 'tp' appears more than once"),
    (dict(world=4, order="tp-ep-dp-pp"), "missing axis 'cp'"),
])
def test_bad_layout_names_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        RankLayout(**kwargs)


def test_default_order_is_megatrons():
    assert DEFAULT_ORDER == "tp-cp-ep-dp-pp"
