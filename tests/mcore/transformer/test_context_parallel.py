"""Context-parallel attention (ring and a2a) at cp=2 on two real ranks (one launch) and at cp=4
on four (a second, small launch) equals full causal attention computed in the same process.

Every rank draws the same full q, k, v and output weight ``w`` ``[b, heads, s, d]``, computes
the reference ``sum(attention(q, k, v) * w)`` and its gradients on the whole sequence, then the
context-parallel output and (dq, dk, dv) of its load-balanced local chunks (``r`` and
``2P-1-r``), and checks them against the matching slices of the reference (1e-5 of the largest
magnitude). Cases cover multi-head, grouped (n_kv < n) and fewer kv heads than ranks, PyNative
and ``mindspore.jit``; a hypothesis test draws sequence lengths and head layouts (derandomized,
no shrinking, so both ranks run the same examples and every rank finishes all of them before
any assertion: a failure never leaves the other rank waiting in a collective).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank

P = 2
# (kind, mode, b, n, n_kv, s, d)
CASES = [
    ("a2a", "pynative", 2, 4, 4, 16, 8),
    ("a2a", "pynative", 1, 4, 2, 12, 8),
    ("a2a", "pynative", 1, 4, 1, 8, 4),
    ("a2a", "jit", 1, 4, 2, 8, 4),
    ("ring", "pynative", 2, 4, 4, 16, 8),
    ("ring", "pynative", 1, 4, 2, 12, 8),
    ("ring", "pynative", 1, 4, 1, 8, 4),
    ("ring", "jit", 1, 4, 2, 8, 4),
]
# cp=4 (a second, smaller launch): the ring's shift with more than two ranks (one all-reduce per
# source) and ranks that see blocks from both lower and higher ranks; a2a with one kv head
# replicated four times.
CASES4 = [
    ("ring", "pynative", 1, 4, 2, 16, 4),
    ("ring", "pynative", 1, 4, 1, 24, 4),
    ("a2a", "pynative", 1, 4, 1, 16, 4),
]


def _name(kind, mode, b, n, n_kv, s, d):
    return f"{kind}_{mode}_b{b}_n{n}_kv{n_kv}_s{s}"


def _local(x, rank, cp):
    """[b, h, s, d] numpy -> this rank's chunks ``rank`` and ``2cp-1-rank`` along dim 2."""
    parts = np.split(x, 2 * cp, axis=2)
    return np.concatenate([parts[rank], parts[2 * cp - 1 - rank]], axis=2)


def _value_and_grads(attend, q, k, v, w, mode):
    """(out, dq, dk, dv) of ``sum(attend(q, k, v) * w)`` as numpy arrays."""
    import mindspore as ms
    from mindspore import nn

    from tests.ms_helpers import compiler

    class Objective(nn.Cell):
        def __init__(self):
            super().__init__()
            self.attend = attend

        def construct(self, q, k, v, w):
            out = self.attend(q, k, v)
            return (out * w).sum(), out

    fn = ms.value_and_grad(Objective(), grad_position=(0, 1, 2), has_aux=True)
    (_, out), grads = compiler(mode)(fn)(*(ms.Tensor(a) for a in (q, k, v, w)))
    return (out.asnumpy(),) + tuple(g.asnumpy() for g in grads)


def _errors(group, kind, mode, b, n, n_kv, s, d, seed=0):
    """Compare one case; return the failures as text (never raises AssertionError)."""
    from mcore.fusions.attention import CoreAttention
    from mcore.transformer.context_parallel import CPAttention
    from tests.mcore.tp_reference import assert_close

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, n, s, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, n_kv, s, d)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal((b, n, s, d)).astype(np.float32)
    scale = d ** -0.5
    full = CoreAttention(n, scale, block_size=5)
    ref = _value_and_grads(full, q, k, v, w, "pynative")
    cp = CPAttention(kind, group, CoreAttention(n, scale, block_size=5), n, n_kv)
    got = _value_and_grads(cp, *(_local(a, group.rank, group.size) for a in (q, k, v, w)), mode)
    errors = []
    for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        try:
            assert_close(g, _local(r, group.rank, group.size), what)
        except AssertionError as e:
            errors.append(f"{_name(kind, mode, b, n, n_kv, s, d)}: {e}")
    return errors


def _hypothesis_lengths(ctx, group):
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    errors = []

    @settings(max_examples=8, derandomize=True, phases=[Phase.generate], database=None,
              deadline=None)
    @given(kind=st.sampled_from(["ring", "a2a"]), chunks=st.integers(1, 9),
           heads=st.sampled_from([(2, 1), (2, 2), (4, 2), (4, 1)]), seed=st.integers(0, 99))
    def run(kind, chunks, heads, seed):
        errors.extend(_errors(group, kind, "pynative", 1, heads[0], heads[1], 2 * P * chunks, 4,
                              seed))

    run()
    with ctx.check("hypothesis_lengths"):
        assert not errors, errors


def _worker(ctx):
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(cp=P)
    for case in CASES:
        errors = _errors(dims.cp, *case)
        with ctx.check(_name(*case)):
            assert not errors, errors
    _hypothesis_lengths(ctx, dims.cp)


def _worker4(ctx):
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(cp=4)
    for case in CASES4:
        errors = _errors(dims.cp, *case)
        with ctx.check(_name(*case)):
            assert not errors, errors


@pytest.fixture(scope="module")
def job():
    return run_ranks(P, "tests.mcore.transformer.test_context_parallel:_worker", timeout=300,
                     stall_timeout=90)


@pytest.mark.parametrize("case", [_name(*c) for c in CASES])
def test_cp_attention_equals_full_attention(job, case):
    job.assert_ok(case)


def test_cp_attention_hypothesis_sequence_lengths(job):
    job.assert_ok("hypothesis_lengths")


@pytest.fixture(scope="module")
def job4():
    return run_ranks(4, "tests.mcore.transformer.test_context_parallel:_worker4", timeout=300,
                     stall_timeout=90)


@pytest.mark.parametrize("case", [_name(*c) for c in CASES4])
def test_cp4_attention_equals_full_attention(job4, case):
    job4.assert_ok(case)


def test_a2a_refuses_heads_not_divisible():
    from mcore.transformer.context_parallel import check_heads

    with pytest.raises(ValueError, match="cp_comm"):
        check_heads("a2a", 3, 3, 2)
    with pytest.raises(ValueError, match="cp_comm"):
        check_heads("a2a", 6, 3, 2)
    with pytest.raises(ValueError, match="cp_comm"):
        check_heads("zigzag", 4, 4, 2)
    check_heads("ring", 3, 3, 2)


def test_cp_attention_refuses_alibi():
    from mcore.fusions.attention import CoreAttention
    from mcore.parallel_state import ProcessGroup
    from mcore.transformer.context_parallel import CPAttention

    group = ProcessGroup("cp", (0, 1), 0, "unused")  # built only: nothing is communicated
    core = CoreAttention(2, 0.5, alibi_slopes=[0.5, 0.25], num_kv_heads=1)
    for kind in ("ring", "a2a"):
        with pytest.raises(ValueError, match="ALiBi"):
            CPAttention(kind, group, core, 2, 1)
