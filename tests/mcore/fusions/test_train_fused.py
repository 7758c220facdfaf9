"""A tiny Llama trains to the same losses with every CPU kernel (``MSFORMERS_FUSIONS=kernels``:
the C++ ones, the opt-in norms too, and the BLAS matmul) and forced off
(``MSFORMERS_FUSIONS=composed``), in graph mode (the training default; PyNative and jit are
covered op by op in test_cpu_kernels.py)."""
from __future__ import annotations

import pytest

from tests.fresh_process import assert_check_passes

TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=40", "model.seq_length=16",
        "model.max_position_embeddings=16"]


def _kernel_cells(model) -> tuple[int, int]:
    """(cells using a C++ CPU kernel, linear layers using the BLAS matmul)."""
    cells = [cell for _, cell in model.cells_and_names()]
    return (sum(bool(getattr(cell, "use_kernel", False))
                + bool(getattr(cell, "use_add_kernel", False))
                + (getattr(cell, "fused", None) is not None and hasattr(cell, "composed"))
                for cell in cells),
            sum(getattr(cell, "blas", None) is not None for cell in cells))


def _train(cfg, state, fusions: str, steps: int):
    import os

    import mindspore as ms
    import numpy as np

    import models
    from mcore.parallel_state import ParallelDims
    from training.model_bridge import hf_config
    from training.step import TrainStep

    os.environ["MSFORMERS_FUSIONS"] = fusions  # read when the layers are built
    model = models.build_from_config(hf_config(cfg.model))
    step = TrainStep(model, ParallelDims.single(), cfg.optimizer, grad_accum_steps=1)
    if state is not None:  # the other run's initial weights
        for name, param in step.named:
            param.set_data(ms.Tensor(state[name]))
    start = step.model_state()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        ids = rng.integers(0, 256, (2, 17)).astype(np.int32)
        losses.append(step([(ids[:, :-1], ids[:, 1:])], 1e-2))
    return start, losses, _kernel_cells(model)


def check_train_same_loss(mode: str) -> None:
    import mindspore as ms
    import numpy as np

    from training.config import load_config
    from training.step import set_mode

    ms.set_device("CPU")
    set_mode(mode)
    cfg = load_config(None, TINY)
    start, fused, n_fused = _train(cfg, None, "kernels", 4)
    _, composed, n_composed = _train(cfg, start, "composed", 4)
    # 2 layers: 2 x (2 norms + residual add & norm + rotary + attention + swiglu) + final norm
    # + the cross-entropy; the BLAS matmul in 2 x (qkv, proj, fc1, fc2) + the output layer
    assert (n_fused, n_composed) == ((14, 9), (0, 0)), (n_fused, n_composed)
    loss_f, loss_c = np.array(fused), np.array(composed)
    assert loss_f[-1, 0] < loss_f[0, 0], "the model did not train"
    np.testing.assert_allclose(loss_f, loss_c, rtol=1e-5)
    print("losses", loss_f[:, 0], loss_c[:, 0])
    print("TRAIN_SAME_OK")


@pytest.mark.parametrize("mode", ["graph"])
def test_train_with_and_without_kernels(mode):
    assert_check_passes("tests.mcore.fusions.test_train_fused", "check_train_same_loss", mode,
                        marker="TRAIN_SAME_OK", timeout=400)
