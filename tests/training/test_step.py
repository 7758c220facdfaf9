"""The AdamW step of training/step.py against a numpy reference (bias correction, decoupled
decay with the should_decay mask, global-norm clipping), in PyNative and graph mode."""

import numpy as np
import pytest

from tests.fresh_process import run_python

TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=16",
        "model.max_position_embeddings=16", "optimizer.clip_grad=0.5", "optimizer.weight_decay=0.1",
        "optimizer.beta2=0.95"]


def _numpy_adamw(w, g, m, v, t, lr, opt, decay):
    m = opt.beta1 * m + (1 - opt.beta1) * g
    v = opt.beta2 * v + (1 - opt.beta2) * g * g
    if decay:
        w = w - lr * opt.weight_decay * w
    w = w - lr * (m / (1 - opt.beta1 ** t)) / (np.sqrt(v / (1 - opt.beta2 ** t)) + opt.eps)
    return w, m, v


def check_adamw(mode: str) -> None:
    """Two steps (t=1, t=2) with clipping active; every parameter and moment vs numpy."""
    import mindspore as ms

    import models
    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.model_bridge import hf_config
    from training.optim import should_decay
    from training.step import TrainStep, set_mode

    ms.set_device("CPU")
    set_mode(mode)
    cfg = load_config(None, TINY)
    model = models.build_from_config(hf_config(cfg.model))
    step = TrainStep(model, ParallelDims.single(), cfg.optimizer, grad_accum_steps=2)
    rng = np.random.default_rng(0)
    opt = cfg.optimizer
    m = {n: np.zeros(p.shape, np.float32) for n, p in step.named}
    v = {n: np.zeros(p.shape, np.float32) for n, p in step.named}
    for it, lr in enumerate([1e-2, 5e-3]):
        batches = [(rng.integers(0, 256, (2, 16)).astype(np.int32),
                    rng.integers(0, 256, (2, 16)).astype(np.int32)) for _ in range(2)]
        w0 = step.model_state()
        scale = ms.Tensor(0.5, ms.float32)
        losses = [float(step.forward_backward(ms.Tensor(x), ms.Tensor(y), scale).asnumpy())
                  for x, y in batches]
        # astype makes a copy: asnumpy() aliases the buffer, which the update then zeroes
        grads = {n: a.asnumpy().astype(np.float64) for (n, _), a in zip(step.named, step.acc)}
        norm_ref = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
        coef = min(1.0, opt.clip_grad / (norm_ref + 1e-6))
        assert coef < 1.0, "the test wants clipping active"
        bc1, bc2 = 1 - opt.beta1 ** (it + 1), 1 - opt.beta2 ** (it + 1)
        norm, loss = step.update(ms.Tensor(lr, ms.float32), ms.Tensor(bc1, ms.float32),
                                 ms.Tensor(bc2, ms.float32), ms.Tensor(np.mean(losses), ms.float32))
        np.testing.assert_allclose(float(norm.asnumpy()), norm_ref, rtol=1e-5)
        np.testing.assert_allclose(float(loss.asnumpy()), np.mean(losses), rtol=1e-6)
        state = step.state_dict()
        w1 = step.model_state()
        for n, p in step.named:
            decay = should_decay(n, len(p.shape))
            w_ref, m[n], v[n] = _numpy_adamw(w0[n].astype(np.float64), grads[n] * coef, m[n], v[n],
                                             it + 1, lr, opt, decay)
            np.testing.assert_allclose(w1[n], w_ref, rtol=1e-5, atol=1e-7, err_msg=n)
            np.testing.assert_allclose(state[f"adam_m.{n}"], m[n], rtol=1e-5, atol=1e-9, err_msg=n)
            np.testing.assert_allclose(state[f"adam_v.{n}"], v[n], rtol=1e-5, atol=1e-12, err_msg=n)
            assert not np.array_equal(w1[n], w0[n]), f"{n} did not change"
        assert all(not a.asnumpy().any() for a in step.acc), "gradient buffers not zeroed"
    assert not should_decay("decoder.final_norm.weight", 1)
    print("ADAMW_OK")


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_adamw_step_matches_numpy(mode):
    # A fresh process per mode: the execution mode is process-global.
    res = run_python(f"from tests.training.test_step import check_adamw; check_adamw({mode!r})",
                     timeout=180)
    assert res.returncode == 0 and "ADAMW_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
