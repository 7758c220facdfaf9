"""The fusions registry: the per-device choice, the composed switch, the fallback when the
kernels cannot be built, and the kernel cache under concurrent first use."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mcore.fusions import cpu_build, registry  # noqa: E402
from mcore.fusions.attention import CoreAttention  # noqa: E402
from mcore.transformer.norm import RMSNorm  # noqa: E402
from tests.multirank import REPO_ROOT  # noqa: E402


@pytest.fixture
def fresh_build():
    """Forget the memoised library before and after (the test changes the environment)."""
    cpu_build.build_cpu_kernels.cache_clear()
    registry.cpu_library.cache_clear()
    yield
    cpu_build.build_cpu_kernels.cache_clear()
    registry.cpu_library.cache_clear()


def test_every_op_has_a_reference():
    assert set(registry.REGISTRY) == {"rms_norm", "add_rms_norm", "swiglu", "rotary", "attention",
                                      "matmul", "small_matmul", "decode_layer", "cross_entropy",
                                      "squared_norm", "adamw", "acc_add", "grouped_matmul",
                                      "moe_permute", "moe_unpermute"}
    for op in registry.REGISTRY.values():
        assert op.reference and (op.cpu_builder or op.device_builders)


def test_forced_composed(monkeypatch):
    monkeypatch.setenv(registry.ENV, "composed")
    assert {registry.choice(n) for n in registry.REGISTRY} == {"composed"}
    assert registry.choice("attention", device="Ascend") == "composed"
    assert registry.fused_cell("rms_norm", eps=1e-6) is None
    assert not RMSNorm(8).use_kernel
    assert not CoreAttention(2, 0.5).use_fused
    with pytest.raises(RuntimeError, match="rms_norm"):
        registry.fused_cell("rms_norm", True, eps=1e-6)


def test_device_choice(monkeypatch):
    monkeypatch.setenv(registry.ENV, "auto")
    assert registry.choice("attention", device="Ascend") == "device"
    assert registry.choice("rms_norm", device="Ascend") == "device"
    assert registry.choice("rotary", device="GPU") == "composed"
    assert registry.choice("swiglu") == registry.choice("rms_norm") == "cpu_kernel"
    assert RMSNorm(8).use_kernel
    opt_in = dataclasses.replace(registry.REGISTRY["rms_norm"], cpu_by_default=False)
    monkeypatch.setitem(registry.REGISTRY, "rms_norm", opt_in)  # an op whose kernel is opt-in
    assert registry.choice("rms_norm") == "composed" and not RMSNorm(8).use_kernel
    monkeypatch.setitem(registry.REGISTRY, "rms_norm", dataclasses.replace(opt_in,
                                                                           cpu_by_default=True))
    assert registry.choice("cross_entropy") == "cpu_kernel"
    assert registry.choice("adamw") == registry.choice("squared_norm") == "cpu_kernel"
    assert registry.choice("cross_entropy", device="Ascend") == "composed"
    monkeypatch.setenv(registry.ENV, "kernels")
    assert registry.choice("attention", device="Ascend") == "device"
    assert registry.choice("rms_norm") == "cpu_kernel"
    assert RMSNorm(8).use_kernel and not RMSNorm(8, fused=False).use_kernel
    assert not RMSNorm(8, dtype=ms.float16).use_kernel


def test_per_op_selection(monkeypatch):
    """``kernels:<op>,<op>``: the CPU kernels of the listed ops only."""
    monkeypatch.setenv(registry.ENV, "kernels:rms_norm, swiglu")
    assert {n: registry.choice(n) for n in registry.REGISTRY} == {
        "rms_norm": "cpu_kernel", "swiglu": "cpu_kernel", "add_rms_norm": "composed",
        "rotary": "composed", "attention": "composed", "matmul": "composed",
        "small_matmul": "composed", "decode_layer": "composed", "cross_entropy": "composed",
        "squared_norm": "composed", "adamw": "composed", "acc_add": "composed",
        "grouped_matmul": "composed", "moe_permute": "composed", "moe_unpermute": "composed"}
    assert registry.choice("attention", device="Ascend") == "device"


def test_bad_switch_names_the_variable(monkeypatch):
    for bad, what in (("fast", "expected one of"), ("composed:rms_norm", "expected one of"),
                      ("kernels:rms_norm,gelu", r"unknown fused op\(s\) \['gelu'\]")):
        monkeypatch.setenv(registry.ENV, bad)
        with pytest.raises(ValueError, match=f"{registry.ENV}=.*{what}"):
            registry.choice("rms_norm")
    with pytest.raises(KeyError, match="unknown fused op"):
        registry.fused_cell("gelu")


@pytest.mark.parametrize("cxx", ["no-such-compiler-xyz", "false"])
def test_no_compiler_falls_back_to_composed(cxx, fresh_build, monkeypatch, tmp_path):
    monkeypatch.setenv(registry.ENV, "kernels")
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("MSFORMERS_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu_build.KernelBuildError, match="no C\\+\\+ compiler" if "xyz" in cxx
                       else "failed"):
        cpu_build.build_cpu_kernels()
    with pytest.warns(RuntimeWarning, match="using composed ops"):
        assert registry.choice("rms_norm") == "composed"
    norm, reference = RMSNorm(8, name="a"), RMSNorm(8, fused=False, name="b")
    assert not norm.use_kernel
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32))
    np.testing.assert_array_equal(norm(x).asnumpy(), reference(x).asnumpy())


def test_concurrent_first_build(tmp_path):
    """Three processes build into one empty cache at once: one library, no temporary left."""
    env = {**os.environ, "MSFORMERS_KERNEL_CACHE": str(tmp_path)}
    code = ("import sys; sys.path.insert(0, %r); from mcore.fusions.cpu_build import "
            "build_cpu_kernels; print(build_cpu_kernels())" % str(REPO_ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1 and os.path.dirname(paths.pop()) == str(tmp_path)
    assert [f.suffix for f in tmp_path.iterdir()] == [".so"]
