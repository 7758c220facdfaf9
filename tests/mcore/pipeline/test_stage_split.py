"""Layer assignment over (virtual) pipeline stages (even, explicit uneven, bad input) and the
schedule chooser; single process."""
from __future__ import annotations

import pytest

from mcore.pipeline_parallel.stage import split_layers


def test_even_and_uneven_splits():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(4, 2, layers_per_stage=[3, 1]) == [range(0, 3), range(3, 4)]
    # interleaved: virtual stage v = chunk * pp + rank; rank 0 holds v = 0 and v = 2
    assert split_layers(6, 2, 2, [2, 1, 2, 1]) == [range(0, 2), range(2, 3), range(3, 5),
                                                   range(5, 6)]


@pytest.mark.parametrize("args, message", [
    ((6, 4, 1, None), r"6 layers do not split evenly over 4 virtual stages \(pp 4 x vpp 1\)"),
    ((4, 2, 1, [3, 1, 0]), r"layers_per_stage has 3 entries for 2 virtual stages"),
    ((4, 2, 1, [3, 2]), r"layers_per_stage \[3, 2\] must be non-negative and sum to "
                        r"num_layers \(4\)"),
])
def test_bad_splits_name_the_culprit(args, message):
    with pytest.raises(ValueError, match=message):
        split_layers(*args)


def test_get_forward_backward_func_picks_the_schedule():
    from mcore.pipeline_parallel import schedules as S

    assert S.get_forward_backward_func(1) is S.forward_backward_no_pipelining
    assert S.get_forward_backward_func(2) is S.forward_backward_pipelining_without_interleaving
    assert S.get_forward_backward_func(2, 2) is S.forward_backward_pipelining_with_interleaving
    with pytest.raises(ValueError, match=r"vpp size \(2\) > 1 needs pp size > 1"):
        S.get_forward_backward_func(1, 2)
