"""The load-balanced context-parallel split (``mcore.context_parallel``): a permutation of the
sequence, equal causal work per rank, and an exact inverse."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcore.context_parallel import (check_cp_sequence, cp_position_ids, cp_token_indices,
                                    gather_from_cp, split_for_cp)


@st.composite
def layouts(draw):
    cp = draw(st.integers(1, 8))
    chunk = draw(st.integers(1, 12))
    return cp, 2 * cp * chunk


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_split_is_balanced_permutation(layout):
    cp, s = layout
    parts = [cp_token_indices(s, cp, r) for r in range(cp)]
    assert all(p.size == s // cp for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(s))
    # causal work of a query at position i: i + 1 keys; equal on every rank
    work = {int((p + 1).sum()) for p in parts}
    assert len(work) == 1
    c = s // (2 * cp)
    assert work == {c * (2 * c * cp + 1)}


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(1, 3))
def test_split_then_gather_is_identity(layout, batch):
    cp, s = layout
    x = np.random.default_rng(s).integers(0, 1000, (batch, s, 3))
    parts = [split_for_cp(x, cp, r) for r in range(cp)]
    assert np.array_equal(gather_from_cp(parts), x)
    for r, part in enumerate(parts):
        pos = cp_position_ids(batch, s, cp, r)
        assert pos.shape == (batch, s // cp) and pos.dtype == np.int32
        assert np.array_equal(part[..., 0], np.take(x[..., 0], pos[0], axis=1))


def test_rank_holds_chunk_r_and_its_mirror():
    assert cp_token_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_token_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp_token_indices(12, 3, 1).tolist() == [2, 3, 8, 9]
    x = np.arange(8).reshape(1, 8)
    assert split_for_cp(x, 1, 0) is x


@pytest.mark.parametrize("s, cp", [(6, 2), (10, 4), (0, 1), (3, 1)])
def test_bad_length_names_it(s, cp):
    with pytest.raises(ValueError, match=r"seq_length=.*2\*cp"):
        check_cp_sequence(s, cp)
    with pytest.raises(ValueError, match="seq_length"):
        cp_token_indices(s, cp, 0)


def test_bad_rank():
    with pytest.raises(ValueError, match="cp rank 2"):
        cp_token_indices(8, 2, 2)
