"""training.dtype: fp16 compute with fp32 master weights and a static loss scale; bf16 refused on
CPU. A tiny Llama trained a few steps in fp16 follows the fp32 losses (2e-2 relative), its
matmuls really run in fp16 (a hook sees fp16 activations, the loss is not bit-equal to fp32), its
parameters and Adam moments stay fp32, and an overflowing step (absurd loss scale) is skipped."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.fresh_process import assert_check_passes
from tests.multirank import REPO_ROOT

PRETRAIN = str(REPO_ROOT / "training" / "pretrain.py")
TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=16",
        "model.max_position_embeddings=16", "optimizer.weight_decay=0.1"]
STEPS, LR = 6, 1e-2  # graph mode; PyNative runs 2


def _build(dtype: str, n_micro: int, loss_scale: float):
    """The model of ``training.dtype=dtype``; the step takes the dtype from the model's
    ``TransformerConfig.precision.compute_dtype``, as ``training.pretrain.build_step`` does."""
    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.model_bridge import build_gpt
    from training.pretrain import compute_dtype
    from training.step import TrainStep

    cfg = load_config(None, TINY + [f"training.dtype={dtype}"])
    model = build_gpt(cfg)
    assert compute_dtype(model) == {"fp32": "float32", "fp16": "float16"}[dtype]
    return TrainStep(model, ParallelDims.single(), cfg.optimizer, grad_accum_steps=n_micro,
                     dtype=compute_dtype(model), loss_scale=loss_scale)


def _train(dtype: str, batches, loss_scale: float, steps: int, hook=None):
    """``steps`` steps on the same micro-batches; returns (losses, step)."""
    step = _build(dtype, len(batches), loss_scale)
    if hook is not None:
        hook(step.model)
    losses = [step(batches, LR)[0] for _ in range(steps)]
    return losses, step


def check_fp16(mode: str) -> None:
    import mindspore as ms

    from training.step import set_mode

    ms.set_device("CPU")
    set_mode(mode)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (2, 16)).astype(np.int32),
                rng.integers(0, 256, (2, 16)).astype(np.int32)) for _ in range(2)]
    steps = STEPS if mode == "graph" else 2  # PyNative is slow: fewer steps
    ref, _ = _train("fp32", batches, 1.0, steps)

    seen = {}

    def record(model):  # PyNative only: hooks with Python side effects do not run in a graph
        if mode != "pynative":
            return
        mlp = model.decoder.layers[0].mlp

        def fc1_hook(cell, inputs, output):  # inputs: as passed in, before to_float's cast
            seen["fc1_in"], seen["fc1_out"] = inputs[0].dtype, output.dtype

        mlp.linear_fc1.register_forward_hook(fc1_hook)

    half, step = _train("fp16", batches, 1024.0, steps, record)
    print("fp32", ref, "\nfp16", half)
    assert len(step.cast_cells) == 2 * 4 + 1, step.cast_cells  # qkv, proj, fc1, fc2 per layer + head
    np.testing.assert_allclose(half, ref, rtol=2e-2)
    assert half != ref, "fp16 losses are bit-equal to fp32: the compute dtype switch did nothing"
    assert all(b < a for a, b in zip(half, half[1:])), half
    assert half[-1] < half[0] - 0.1 * steps, half
    if mode == "pynative":  # fp32 residual stream in, fp16 matmul out
        assert seen == {"fc1_in": ms.float32, "fc1_out": ms.float16}, seen
    # fp32 master weights and moments; the loss itself is fp32
    assert all(p.dtype == ms.float32 for _, p in step.named)
    assert all(m.dtype == ms.float32 and v.dtype == ms.float32
               for m, v in zip(step.update.m, step.update.v))
    loss = step.loss_cell(ms.Tensor(batches[0][0]), ms.Tensor(batches[0][1]))
    assert loss.dtype == ms.float32

    # An overflowing backward (scale 1e30 makes the fp16 activation gradients inf) skips the step.
    big = _build("fp16", len(batches), 1e30)
    w0, s0 = big.model_state(), big.state_dict()
    loss, norm = big(batches, LR)
    assert np.isfinite(loss) and not np.isfinite(norm), (loss, norm)
    w1, s1 = big.model_state(), big.state_dict()
    assert all(np.array_equal(w0[k], w1[k]) for k in w0), "an overflowed step changed the weights"
    assert all(np.array_equal(s0[k], s1[k]) for k in s0), "an overflowed step changed the moments"
    assert all(not a.asnumpy().any() for a in big.acc), "gradient buffers not zeroed"
    assert (big.adam_steps, big.skipped_in_a_row) == (0, 1), "a skipped step advanced AdamW's t"
    print("PRECISION_OK")


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_fp16_tracks_fp32(mode):
    # A fresh process per mode: the execution mode is process-global.
    assert_check_passes("tests.training.test_precision", "check_fp16", mode, marker="PRECISION_OK")


def test_precision_resolution():
    from training.config import ConfigError, load_config
    from training.pretrain import precision

    def cfg(*extra):
        return load_config(None, list(extra))

    assert precision(cfg(), "CPU") == ("fp32", 1.0)
    assert precision(cfg("training.dtype=float16"), "CPU") == ("fp16", 1024.0)
    assert precision(cfg("training.dtype=fp16", "training.loss_scale=128"), "CPU") == ("fp16", 128.0)
    assert precision(cfg("training.dtype=bf16"), "Ascend") == ("bf16", 1.0)  # decided by device
    with pytest.raises(ConfigError, match=r"^training\.dtype=bf16: MindSpore 2\.10 has no bf16 "
                                          r"compute kernels on CPU; use fp32 or fp16$"):
        precision(cfg("training.dtype=bf16"), "CPU")
    with pytest.raises(ConfigError, match="training.loss_scale"):
        precision(cfg("training.dtype=fp16", "training.loss_scale=0"), "CPU")
    with pytest.raises(ConfigError, match="training.dtype"):
        cfg("training.dtype=fp8")


def test_bf16_refused_before_work_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, PRETRAIN, "--config", str(REPO_ROOT / "configs/tiny_llama_demo.yaml"),
                          "training.dtype=bf16", f"logging.output_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "MSF_DEVICE": "CPU"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        "config error: training.dtype=bf16: MindSpore 2.10 has no bf16 compute kernels on CPU; "
        "use fp32 or fp16"], res.stderr
    assert not (tmp_path / "out").exists()
