"""Each CPU kernel of mcore.fusions against its composed reference, forward and backward
(every input's gradient), over shapes drawn by hypothesis (odd sizes included) in PyNative and
on fixed odd shapes under ``mindspore.jit``. The kernels must build here: CI has g++."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import Tensor, nn, ops  # noqa: E402

from mcore.fusions.attention import CoreAttention  # noqa: E402
from mcore.fusions.registry import choice, fused_cell  # noqa: E402
from mcore.transformer.mlp import silu  # noqa: E402
from mcore.transformer.norm import RMSNorm  # noqa: E402
from mcore.transformer.rotary import apply_rotary  # noqa: E402
from tests.ms_helpers import compiler  # noqa: E402

SETTINGS = settings(max_examples=8, deadline=None)


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    """Every check here uses the CPU kernels, whatever ``MSFORMERS_FUSIONS`` the run has."""
    monkeypatch.setenv("MSFORMERS_FUSIONS", "kernels")


class ComposedRMSNorm(nn.Cell):
    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def construct(self, x, w):
        return w * (x * ops.rsqrt(ops.mean(x * x, -1, True) + self.eps))


class ComposedAddRMSNorm(nn.Cell):
    """``[s | RMSNorm(s)]`` with ``s = x + r`` (both outputs in one tensor, so that one probe
    reaches both gradients)."""

    def __init__(self, eps):
        super().__init__()
        self.norm = ComposedRMSNorm(eps)

    def construct(self, x, r, w):
        s = x + r
        return ops.concat((s, self.norm(s, w)), -1)  # 2 x [..., h] -> [..., 2h]


class BothOutputs(nn.Cell):
    """A two-output op as ``[first | second]`` along the last dim."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, *inputs):
        first, second = self.op(*inputs)
        return ops.concat((first, second), -1)  # 2 x [..., h] -> [..., 2h]


class ComposedSwiGLU(nn.Cell):
    def construct(self, y):
        gate, up = ops.split(y, y.shape[-1] // 2, -1)  # [..., 2f] -> 2 x [..., f]
        return silu(gate) * up


class ComposedRotary(nn.Cell):
    def __init__(self, interleaved):
        super().__init__()
        self.interleaved = interleaved

    def construct(self, x, cos, sin):
        return apply_rotary(x, cos, sin, self.interleaved)


class Objective(nn.Cell):
    """``sum(op(*inputs) * probe)``: its input gradients are op's vector-Jacobian products."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, probe, *inputs):
        return ops.sum(self.op(*inputs) * probe)


def forward_and_grads(op, inputs, probe, mode="pynative", wrt=None):
    wrt = tuple(range(1, len(inputs) + 1)) if wrt is None else wrt
    out = compiler(mode)(op)(*inputs)
    grads = compiler(mode)(ms.grad(Objective(op), wrt))(probe, *inputs)
    grads = grads if isinstance(grads, tuple) else (grads,)
    return out.asnumpy(), [g.asnumpy() for g in grads]


def assert_agree(kernel, reference, inputs, mode="pynative", wrt=None):
    probe = Tensor(np.random.default_rng(9).standard_normal(
        reference(*inputs).shape).astype(np.float32))
    out_k, grads_k = forward_and_grads(kernel, inputs, probe, mode, wrt)
    out_r, grads_r = forward_and_grads(reference, inputs, probe, mode, wrt)
    np.testing.assert_allclose(out_k, out_r, rtol=1e-5, atol=1e-5)
    assert len(grads_k) == len(grads_r)
    for g_k, g_r in zip(grads_k, grads_r):
        np.testing.assert_allclose(g_k, g_r, rtol=1e-4, atol=1e-4)


def tensor(rng, *shape, scale=1.0):
    return Tensor((scale * rng.standard_normal(shape)).astype(np.float32))


def test_kernels_are_built_on_cpu():
    assert {choice(n) for n in ("rms_norm", "add_rms_norm", "swiglu", "rotary",
                                "attention")} == {"cpu_kernel"}


@SETTINGS
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=3), h=st.integers(1, 70),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]), seed=st.integers(0, 99))
def test_rms_norm(rows, h, eps, seed):
    rng = np.random.default_rng(seed)
    inputs = (tensor(rng, *rows, h, scale=3.0), tensor(rng, h))
    assert_agree(fused_cell("rms_norm", True, eps=eps), ComposedRMSNorm(eps), inputs)


@SETTINGS
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=3), h=st.integers(1, 70),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]), seed=st.integers(0, 99))
def test_add_rms_norm(rows, h, eps, seed):
    rng = np.random.default_rng(seed)
    inputs = (tensor(rng, *rows, h, scale=3.0), tensor(rng, *rows, h), tensor(rng, h))
    assert_agree(BothOutputs(fused_cell("add_rms_norm", True, eps=eps)), ComposedAddRMSNorm(eps),
                 inputs)


def test_rms_norm_add_and_norm_casts_the_residual():
    """``RMSNorm.add_and_norm``: kernel and composed agree; an fp16 residual (an fp16 matmul's
    output in mixed precision) is promoted as the plain add would."""
    rng = np.random.default_rng(4)
    fused, plain = RMSNorm(24, name="a"), RMSNorm(24, fused=False, name="b")
    assert fused.fuse_residual_add() and not plain.fuse_residual_add()
    x, r = tensor(rng, 2, 5, 24), tensor(rng, 2, 5, 24).astype(ms.float16)
    for got, want in zip(fused.add_and_norm(x, r), plain.add_and_norm(x, r)):
        assert got.dtype == want.dtype == ms.float32
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=3), f=st.integers(1, 70),
       seed=st.integers(0, 99))
def test_swiglu(rows, f, seed):
    rng = np.random.default_rng(seed)
    assert_agree(fused_cell("swiglu", True), ComposedSwiGLU(), (tensor(rng, *rows, 2 * f, scale=3.0),))


@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(1, 3), s=st.integers(1, 9), half=st.integers(1, 9),
       extra=st.sampled_from([0, 0, 2, 5]), cos_batch=st.booleans(), interleaved=st.booleans(),
       seed=st.integers(0, 99))
def test_rotary(b, n, s, half, extra, cos_batch, interleaved, seed):
    rng = np.random.default_rng(seed)
    r = 2 * half
    cb = b if cos_batch else 1
    inputs = (tensor(rng, b, n, s, r + extra), tensor(rng, cb, 1, s, r), tensor(rng, cb, 1, s, r))
    # gradient w.r.t. x only: the kernel treats cos / sin as constants (positions)
    assert_agree(fused_cell("rotary", True, interleaved=interleaved), ComposedRotary(interleaved),
                 inputs, wrt=1)


def attention_reference(q, k, v, scale, probe):
    """numpy float64: causal GQA attention (queries at the end of the keys) and the gradients
    of ``sum(out * probe)`` w.r.t. q, k, v."""
    b, n, s, d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    kr = np.repeat(k, n // n_kv, axis=1)  # [b, n_kv, t, d] -> [b, n, t, d]
    vr = np.repeat(v, n // n_kv, axis=1)
    scores = np.einsum("bnsd,bntd->bnst", q, kr) * scale
    hidden = np.arange(t)[None, :] > np.arange(s)[:, None] + (t - s)  # [s, t]
    scores = np.where(hidden, -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ vr
    dp = probe @ np.swapaxes(vr, -1, -2)  # [b, n, s, t]
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = ds @ kr * scale
    dk = (np.swapaxes(ds, -1, -2) @ q * scale).reshape(b, n_kv, n // n_kv, t, d).sum(2)
    dv = (np.swapaxes(p, -1, -2) @ probe).reshape(b, n_kv, n // n_kv, t, d).sum(2)
    return out, [dq, dk, dv]


@SETTINGS
@given(b=st.integers(1, 2), n_kv=st.integers(1, 3), group=st.integers(1, 3), s=st.integers(1, 19),
       cached=st.integers(0, 6), d=st.integers(1, 17), seed=st.integers(0, 99))
def test_causal_attention(b, n_kv, group, s, cached, d, seed):
    """Keys = ``cached`` earlier positions + the ``s`` queries' own. Reference: numpy (the
    composed ``blocked_attention`` is compared under jit below; its PyNative backward fails on
    some shapes with size-1 dims, a MindSpore matmul-broadcast issue)."""
    rng = np.random.default_rng(seed)
    n, t = n_kv * group, s + cached
    arrays = [rng.standard_normal(shape).astype(np.float32)
              for shape in ((b, n, s, d), (b, n_kv, t, d), (b, n_kv, t, d), (b, n, s, d))]
    kernel = CoreAttention(n, d ** -0.5)
    assert kernel.use_kernel
    out, grads = forward_and_grads(kernel, [Tensor(a) for a in arrays[:3]], Tensor(arrays[3]))
    out_ref, grads_ref = attention_reference(*[a.astype(np.float64) for a in arrays[:3]],
                                             d ** -0.5, arrays[3].astype(np.float64))
    np.testing.assert_allclose(out, out_ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b, n_kv, group, s, cached, d", [(1, 2, 3, 100, 45, 24),
                                                          (2, 1, 1, 130, 0, 72)])
def test_causal_attention_across_key_blocks(b, n_kv, group, s, cached, d):
    """Several query tiles and blocks of 64 keys (the hypothesis shapes above fit one block):
    the online softmax rescales rows whose maximum moves to a later block (scores spread by a
    larger ``q``), a head size that is no multiple of 16, a last tile of fewer positions."""
    rng = np.random.default_rng(5)
    n, t = n_kv * group, s + cached
    q = 3.0 * rng.standard_normal((b, n, s, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, n_kv, t, d)).astype(np.float32) for _ in range(2))
    probe = rng.standard_normal((b, n, s, d)).astype(np.float32)
    kernel = CoreAttention(n, d ** -0.5)
    assert kernel.use_kernel
    out, grads = forward_and_grads(kernel, [Tensor(a) for a in (q, k, v)], Tensor(probe))
    out_ref, grads_ref = attention_reference(*[a.astype(np.float64) for a in (q, k, v)],
                                             d ** -0.5, probe.astype(np.float64))
    np.testing.assert_allclose(out, out_ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rotary_non_contiguous_input():
    rng = np.random.default_rng(3)
    x = ops.swapaxes(tensor(rng, 2, 7, 3, 10), 1, 2)  # [b, s, n, d] -> [b, n, s, d] (a view)
    cos, sin = tensor(rng, 1, 1, 7, 10), tensor(rng, 1, 1, 7, 10)
    assert_agree(fused_cell("rotary", True), ComposedRotary(False), (x, cos, sin), wrt=1)


def test_kernels_under_jit():
    rng = np.random.default_rng(1)
    assert_agree(fused_cell("rms_norm", True, eps=1e-5), ComposedRMSNorm(1e-5),
                 (tensor(rng, 3, 5, 37), tensor(rng, 37)), mode="jit")
    assert_agree(BothOutputs(fused_cell("add_rms_norm", True, eps=1e-5)), ComposedAddRMSNorm(1e-5),
                 (tensor(rng, 3, 5, 37), tensor(rng, 3, 5, 37), tensor(rng, 37)), mode="jit")
    assert_agree(fused_cell("swiglu", True), ComposedSwiGLU(), (tensor(rng, 3, 5, 2 * 23),),
                 mode="jit")
    for interleaved in (False, True):
        assert_agree(fused_cell("rotary", True, interleaved=interleaved),
                     ComposedRotary(interleaved),
                     (tensor(rng, 2, 3, 7, 12), tensor(rng, 2, 1, 7, 8), tensor(rng, 2, 1, 7, 8)),
                     mode="jit", wrt=1)
    assert_agree(CoreAttention(6, 0.3), CoreAttention(6, 0.3, block_size=4, use_fused=False),
                 (tensor(rng, 2, 6, 9, 5), tensor(rng, 2, 3, 11, 5), tensor(rng, 2, 3, 11, 5)),
                 mode="jit")


@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_layers_use_composed_math_for_other_dtypes(dtype):
    """A float32 RMSNorm with a kernel given a low-precision input computes it as before."""
    rng = np.random.default_rng(2)
    x = tensor(rng, 2, 3, 16).astype(dtype)
    fused, plain = RMSNorm(16, fused=True, name="a"), RMSNorm(16, fused=False, name="b")
    assert fused.use_kernel and not plain.use_kernel
    np.testing.assert_array_equal(fused(x).astype(ms.float32).asnumpy(),
                                  plain(x).astype(ms.float32).asnumpy())
