"""The AdamW step of training/step.py against a numpy reference (bias correction, decoupled
decay with the should_decay mask, global-norm clipping), in PyNative and graph mode."""

import numpy as np
import pytest

from tests.fresh_process import assert_check_passes

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


ZERO = ["optimizer.distributed=true", "optimizer.bucket_size=3000"]  # 6 buckets, params cut


def check_adamw(mode: str, distributed: bool = False) -> None:
    """Two steps (t=1, t=2) with clipping active; every parameter and moment vs numpy. With
    ``distributed`` through ``DistributedAdamW`` (one rank: one shard holding every piece)."""
    import mindspore as ms

    import models
    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.model_bridge import hf_config
    from training.optim import should_decay
    from training.step import TrainStep, set_mode

    ms.set_device("CPU")
    set_mode(mode)
    cfg = load_config(None, TINY + (ZERO if distributed else []))
    model = models.build_from_config(hf_config(cfg.model))
    step = TrainStep(model, ParallelDims.single(), cfg.optimizer, grad_accum_steps=2)
    assert step.update.sharded == distributed
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
            got_m, got_v = (state[f"adam_{k}.{n}"].reshape(p.shape) for k in "mv")  # pieces: 1-D
            np.testing.assert_allclose(got_m, m[n], rtol=1e-5, atol=1e-9, err_msg=n)
            np.testing.assert_allclose(got_v, v[n], rtol=1e-5, atol=1e-12, err_msg=n)
            assert not np.array_equal(w1[n], w0[n]), f"{n} did not change"
        assert all(not a.asnumpy().any() for a in step.acc), "gradient buffers not zeroed"
    assert not should_decay("decoder.final_norm.weight", 1)
    print("ADAMW_OK")


@pytest.mark.parametrize("mode, distributed", [("pynative", False), ("graph", False),
                                               ("graph", True)])
def test_adamw_step_matches_numpy(mode, distributed):
    # A fresh process per mode: the execution mode is process-global.
    assert_check_passes("tests.training.test_step", "check_adamw", mode, distributed,
                        marker="ADAMW_OK")


def test_skipped_update_does_not_advance_adamw():
    """The bookkeeping TrainStep and PipelineTrainStep share (``TrainState.apply_update``): the
    bias correction of the next update uses t = applied updates + 1, so a skipped step (loss or
    norm not finite) leaves t where it was; ``skipped_in_a_row`` counts consecutive skips."""
    import mindspore as ms

    from training.config import load_config
    from training.pipeline_step import PipelineTrainStep
    from training.step import TrainState, TrainStep, update_applied

    opt = load_config(None, ["optimizer.beta1=0.5", "optimizer.beta2=0.75"]).optimizer

    class Recorder(TrainState):  # AdamWUpdate replaced by a stub returning chosen (norm, loss)
        def __init__(self, results):
            self.opt, self.results, self.seen = opt, iter(results), []

        def _update(self, lr, bc1, bc2, loss):
            self.seen.append((float(bc1.asnumpy()), float(bc2.asnumpy())))
            norm, loss = next(self.results)
            return ms.Tensor(norm, ms.float32), ms.Tensor(loss, ms.float32)

    nan, inf = float("nan"), float("inf")
    state = Recorder([(1.0, 2.0), (nan, 2.0), (2.0, inf), (3.0, 2.0), (inf, nan)])
    counts = []
    for _ in range(5):
        loss, norm = state.apply_update(1e-3, 2.0)
        counts.append((state.adam_steps, state.skipped_in_a_row, update_applied(loss, norm)))
    assert counts == [(1, 0, True), (1, 1, False), (1, 2, False), (2, 0, True), (2, 1, False)]
    t = [1, 2, 2, 2, 3]  # AdamW's step number handed to each update
    np.testing.assert_allclose(state.seen, [(1 - 0.5 ** k, 1 - 0.75 ** k) for k in t], rtol=1e-6)
    assert state.scalars() == {"adam_steps": 2}
    # Both step classes use this one implementation.
    for cls in (TrainStep, PipelineTrainStep):
        assert cls.apply_update is TrainState.apply_update and cls.load is TrainState.load


def check_fp32_skip(mode: str, distributed: bool = False) -> None:
    """A fp32 step whose loss and gradients are NaN (an inf weight) changes nothing and does not
    advance AdamW's step count (the count loaded with the weights stays); also through the
    distributed optimizer."""
    import mindspore as ms

    import models
    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.model_bridge import hf_config
    from training.step import TrainStep, set_mode

    ms.set_device("CPU")
    set_mode(mode)
    cfg = load_config(None, TINY + (ZERO if distributed else []))
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (2, 16)).astype(np.int32),
                rng.integers(0, 256, (2, 16)).astype(np.int32)) for _ in range(2)]
    step = TrainStep(models.build_from_config(hf_config(cfg.model)), ParallelDims.single(),
                     cfg.optimizer, grad_accum_steps=2)
    assert step.update.sharded == distributed
    w0, s0 = step.model_state(), step.state_dict()
    name = next(n for n in w0 if "embedding" in n)
    w0[name][batches[0][0][0, 0]] = np.inf  # one token's embedding: NaN loss and gradients
    step.load(w0, s0, {"adam_steps": 3})
    loss, norm = step(batches, 1e-2)
    assert not np.isfinite(norm), (loss, norm)
    assert (step.adam_steps, step.skipped_in_a_row) == (3, 1)
    w1, s1 = step.model_state(), step.state_dict()
    assert all(np.array_equal(w0[k], w1[k], equal_nan=True) for k in w0), "a skipped step changed weights"
    assert all(np.array_equal(s0[k], s1[k]) for k in s0), "a skipped step changed the moments"
    assert all(not a.asnumpy().any() for a in step.acc), "gradient buffers not zeroed"
    print("SKIP_OK")


@pytest.mark.parametrize("mode, distributed", [("pynative", False), ("graph", False),
                                               ("graph", True)])
def test_fp32_nonfinite_step_is_skipped(mode, distributed):
    assert_check_passes("tests.training.test_step", "check_fp32_skip", mode, distributed,
                        marker="SKIP_OK")
