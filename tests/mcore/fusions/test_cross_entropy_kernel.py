"""The fused cross-entropy (registry op ``cross_entropy``, a CPU kernel on by default) against
the composed ``VocabParallelCrossEntropy`` at tp=1: per-token loss and the logits' gradient,
over shapes and labels drawn by hypothesis (ignored rows included) in PyNative and under
``mindspore.jit``, plus the choices around it (dtype upcast, switch, tp > 1)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import Tensor, nn  # noqa: E402

from mcore.fusions import registry  # noqa: E402
from mcore.parallel_state import ProcessGroup  # noqa: E402
from mcore.tensor_parallel.cross_entropy import (TokenCrossEntropy,  # noqa: E402
                                                 VocabParallelCrossEntropy)
from tests.mcore.fusions.test_cpu_kernels import assert_agree  # noqa: E402

SINGLE = ProcessGroup.single("tp")


class Composed(nn.Cell):
    def __init__(self, ignore_index=-100):
        super().__init__()
        self.ce = VocabParallelCrossEntropy(SINGLE, ignore_index)

    def construct(self, logits, labels):
        return self.ce(logits, labels)[0]


def inputs(rng, rows, v, ignored, scale=4.0, ignore_index=-100, dtype=np.int32):
    logits = (scale * rng.standard_normal((*rows, v))).astype(np.float32)
    labels = rng.integers(0, v, rows).astype(dtype)
    labels[rng.random(rows) < ignored] = ignore_index
    return Tensor(logits), Tensor(labels)


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    """The default mode: this op's kernel is on without ``MSFORMERS_FUSIONS=kernels``."""
    monkeypatch.setenv(registry.ENV, "auto")


def test_on_by_default_and_switched_off_by_composed(monkeypatch):
    assert registry.choice("cross_entropy") == "cpu_kernel"
    assert TokenCrossEntropy(SINGLE).fused is not None
    assert TokenCrossEntropy(SINGLE, label_smoothing=0.1).fused is None  # composed math
    assert TokenCrossEntropy(SINGLE, fused=False).fused is None
    monkeypatch.setenv(registry.ENV, "composed")
    assert TokenCrossEntropy(SINGLE).fused is None


def test_fused_true_needs_tp1_without_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        TokenCrossEntropy(SINGLE, label_smoothing=0.1, fused=True)
    with pytest.raises(ValueError, match="tp=2"):
        TokenCrossEntropy(ProcessGroup("tp", (0, 1), 0, None), fused=True)


@settings(max_examples=10, deadline=None)
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=2), v=st.integers(1, 300),
       ignored=st.sampled_from([0.0, 0.3, 1.0]), scale=st.sampled_from([0.1, 4.0, 300.0]),
       wide=st.booleans(), seed=st.integers(0, 99))
def test_agrees_with_composed(rows, v, ignored, scale, wide, seed):
    """Large ``scale``: logits ~1e2-1e3, where an unshifted exp would overflow."""
    rng = np.random.default_rng(seed)
    args = inputs(rng, rows, v, ignored, scale, dtype=np.int64 if wide else np.int32)
    assert_agree(TokenCrossEntropy(SINGLE, fused=True), Composed(), args, wrt=1)


def test_agrees_under_jit_and_with_a_nonnegative_ignore_index():
    rng = np.random.default_rng(5)
    assert_agree(TokenCrossEntropy(SINGLE, fused=True), Composed(),
                 inputs(rng, (3, 7), 1001, 0.2), mode="jit", wrt=1)
    args = inputs(rng, (4, 6), 50, 0.3, ignore_index=0)  # pad id 0 ignored, like -100
    assert_agree(TokenCrossEntropy(SINGLE, ignore_index=0, fused=True), Composed(ignore_index=0),
                 args, mode="jit", wrt=1)


@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_low_precision_logits_are_upcast(dtype):
    """fp16 / bf16 logits: the loss is the float32 loss of the same (rounded) logits."""
    rng = np.random.default_rng(4)
    logits, labels = inputs(rng, (2, 5), 64, 0.2)
    low = logits.astype(dtype)
    got = TokenCrossEntropy(SINGLE, fused=True)(low, labels)
    assert got.dtype == ms.float32
    want = Composed()(low.astype(ms.float32), labels)
    np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-6, atol=1e-6)
