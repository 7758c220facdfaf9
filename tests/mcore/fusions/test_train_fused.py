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


def check_acc_add_bit_exact(mode: str) -> None:
    """Two steps of two micro-batches with only the ``acc_add`` kernel on and with everything
    composed: the same weights to the bit (the kernel's in-place ``acc += g`` is the same sum as
    ``ops.assign_add``, and it did run: without it the weights would not move alike)."""
    import os

    import mindspore as ms
    import numpy as np

    import models
    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.model_bridge import hf_config
    from training.step import TrainStep, set_mode

    ms.set_device("CPU")
    set_mode(mode)
    cfg = load_config(None, TINY)
    runs, start = [], None
    for fusions in ("kernels:acc_add", "composed"):
        os.environ["MSFORMERS_FUSIONS"] = fusions
        model = models.build_from_config(hf_config(cfg.model))
        step = TrainStep(model, ParallelDims.single(), cfg.optimizer, grad_accum_steps=2)
        assert step.forward_backward.fused == (fusions != "composed")
        if start is not None:
            for name, param in step.named:
                param.set_data(ms.Tensor(start[name]))
        start = step.model_state()
        rng = np.random.default_rng(0)
        for _ in range(2):
            ids = rng.integers(0, 256, (4, 17)).astype(np.int32)
            step([(ids[:2, :-1], ids[:2, 1:]), (ids[2:, :-1], ids[2:, 1:])], 1e-2)
        runs.append(step.model_state())
    weights = [name for name, _ in step.named]
    still = [name for name in weights if np.array_equal(start[name], runs[0][name])]
    assert not still, f"weights that did not move: {still}"
    for name in start:
        np.testing.assert_array_equal(runs[0][name].view(np.uint32), runs[1][name].view(np.uint32),
                                      err_msg=name)
    print("ACC_ADD_OK")


def test_acc_add_kernel_is_bit_exact():
    assert_check_passes("tests.mcore.fusions.test_train_fused", "check_acc_add_bit_exact", "graph",
                        marker="ACC_ADD_OK", timeout=400)
