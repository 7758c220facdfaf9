"""The registry op "small_matmul" (``csrc/small_matmul.cc``, decoding's few rows) against
``ops.MatMul(transpose_b=True)``: forward and both gradients in PyNative and under
``mindspore.jit`` for 1..8 rows and odd sizes; the same bits for 1, 2 and 3 threads; the linear
layers take it for float32 inputs of at most ``LAYER_ROWS`` rows only."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import nn, ops  # noqa: E402

from mcore.fusions import registry  # noqa: E402
from mcore.fusions.cpu_build import build_cpu_kernels  # noqa: E402
from mcore.fusions.decode_ops import LAYER_ROWS  # noqa: E402
from mcore.fusions.registry import choice, fused_cell  # noqa: E402
from mcore.parallel_state import ProcessGroup  # noqa: E402
from mcore.tensor_parallel.layers import ColumnParallelLinear  # noqa: E402
from tests.mcore.fusions.test_cpu_kernels import assert_agree, tensor  # noqa: E402
from tests.multirank import REPO_ROOT  # noqa: E402


class _Reference(nn.Cell):
    def construct(self, x, w):
        rows = x.reshape((-1, x.shape[-1]))  # [..., k] -> [m, k]
        y = ops.MatMul(transpose_b=True)(rows, w)  # [m, n]
        return y.reshape(x.shape[:-1] + (w.shape[0],))  # [m, n] -> [..., n]


def test_on_by_default_on_cpu(monkeypatch):
    monkeypatch.setenv(registry.ENV, "auto")
    assert choice("small_matmul") == "cpu_kernel"
    monkeypatch.setenv(registry.ENV, "composed")
    assert choice("small_matmul") == "composed"


@pytest.mark.parametrize("lead", [(1,), (3,), (8,), (2, 1), (8, 1)])
@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_agrees_with_matmul(lead, mode):
    rng = np.random.default_rng(sum(lead))
    # k 37: a masked tail of 5 after two 16-lane steps; n 131: an odd last row of w; the head
    # size n 2100 x k 512 (4.3 MB) wakes the helper threads
    for n, k in ((131, 37), (2100, 512)):
        inputs = (tensor(rng, *lead, k), tensor(rng, n, k, scale=0.1))
        assert_agree(fused_cell("small_matmul", True), _Reference(), inputs, mode)


_THREADS_SCRIPT = """
import ctypes, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1])
rng = np.random.default_rng(0)
out = []
for m, n, k in ((1, 3000, 512), (2, 2051, 300), (3, 2049, 300), (5, 2049, 300), (8, 32, 17),
                (8, 1100, 300)):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    y = np.full((m, n), np.nan, np.float32)
    arrays = [x, w, y]
    dims = [(ctypes.c_int64 * 2)(*a.shape) for a in arrays]
    rc = lib.SmallMatmulNT(3, (ctypes.c_void_p * 3)(*[a.ctypes.data for a in arrays]),
                           (ctypes.c_int * 3)(2, 2, 2),
                           (ctypes.POINTER(ctypes.c_int64) * 3)(*dims),
                           (ctypes.c_char_p * 3)(b"float32", b"float32", b"float32"), None, None)
    assert rc == 0
    out.append(y)
np.save(sys.stdout.buffer, np.concatenate([y.ravel() for y in out]))
"""


def assert_same_bits_per_pool_size(script: str):
    """Runs ``script`` (argv[1]: the kernel library; it writes one array with ``np.save`` to
    stdout) in one process per pool size 1, 2, 3 (the pool is sized once per process, from
    ``$MSFORMERS_DECODE_THREADS``) and asserts the arrays are NaN-free and the same bits."""
    library = build_cpu_kernels()
    results = []
    for threads in (1, 2, 3):
        env = dict(os.environ, MSFORMERS_DECODE_THREADS=str(threads))
        out = subprocess.run([sys.executable, "-c", script, library], env=env,
                             capture_output=True, timeout=60, cwd=REPO_ROOT)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        results.append(np.load(io.BytesIO(out.stdout)))
    assert not np.isnan(results[0]).any()
    for other in results[1:]:
        assert other.tobytes() == results[0].tobytes()


def test_same_bits_for_any_thread_count():
    assert_same_bits_per_pool_size(_THREADS_SCRIPT)


def test_layers_take_it_for_few_float32_rows(monkeypatch):
    monkeypatch.setenv(registry.ENV, "auto")
    layer = ColumnParallelLinear(24, 40, ProcessGroup.single(), bias=True, name="s")
    assert layer.small is not None
    w = layer.weight
    rng = np.random.default_rng(1)
    assert layer.small_rows(tensor(rng, 2, 1, 24), w)
    assert layer.small_rows(tensor(rng, LAYER_ROWS, 24), w)
    assert not layer.small_rows(tensor(rng, LAYER_ROWS + 1, 1, 24), w)  # ops.MatMul / sgemm
    assert not layer.small_rows(tensor(rng, 2, 24).astype(ms.float16), w)
    for shape in ((2, 1, 24), (LAYER_ROWS + 1, 1, 24)):  # with and without the kernel
        x = tensor(rng, *shape)
        expected = x.asnumpy() @ w.asnumpy().T + layer.bias.asnumpy()
        np.testing.assert_allclose(layer(x).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    layer.to_float(ms.float16)  # mixed precision: the primitives get float16 inputs
    assert not layer.small_rows(tensor(rng, 2, 1, 24), w)
    assert layer(tensor(rng, 2, 1, 24)).shape == (2, 1, 40)
