"""A MoE GPTModel with expert parallelism on 2 real ranks equals the ep=1 model (one launch,
``_worker``, runs every check).

Each rank feeds its own batch (ep ranks are data-parallel ranks for the dense part). Against
the ep=1 model of the same config (same weights: initialisation is seeded by parameter name
and global expert index) run alone on each rank's batch:

- loss, LM loss, per-layer aux losses and per-expert counts equal the rank's ep=1 numbers;
- gradients of replicated parameters (embedding, attention, dense MLP, router, head) equal
  the rank's ep=1 gradients; the gradient of each local expert slice
  ``experts.fc1/fc2[E/2 * r : E/2 * (r + 1)]`` equals the sum of the ep=1 gradients over both
  ranks' batches (tokens of every rank reach the expert through the dispatcher);
- for the all-to-all and the all-gather dispatcher in PyNative, and the all-gather one under
  ``mindspore.jit``.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank

CASES = (("AllToAllDispatcher", False), ("AllGatherDispatcher", False),
         ("AllGatherDispatcher", True))


def _tag(dispatcher: str, jit: bool) -> str:
    return f"gpt_ep2_{dispatcher}_{'jit' if jit else 'pynative'}"


def _check(ctx, dims, dispatcher, jit):
    from mcore.parallel_state import ModelGroups
    from tests.models.moe_helpers import E, batch, loss_and_grads, moe_config, moe_model

    r = dims.ep.rank
    batches = [batch(10 + q) for q in range(2)]
    single = moe_model(moe_config(), dispatcher=dispatcher)
    refs = [loss_and_grads(single, *batches[q]) for q in range(2)]
    model = moe_model(moe_config(), groups=ModelGroups.from_dims(dims), dispatcher=dispatcher)
    with ctx.check(_tag(dispatcher, jit)):
        loss, lm_loss, aux, counts, grads = loss_and_grads(model, *batches[r], jit=jit)
        ref = refs[r]
        np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
        np.testing.assert_allclose(lm_loss, ref[1], rtol=1e-5)
        np.testing.assert_allclose(aux, ref[2], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(counts, ref[3])
        assert grads.keys() == ref[4].keys()
        local = slice(E // 2 * r, E // 2 * (r + 1))
        experts = [n for n in grads if ".mlp.experts." in n]
        assert len(experts) == 4
        for name, grad in grads.items():
            if name in experts:
                want = (refs[0][4][name] + refs[1][4][name])[local]
            else:
                want = ref[4][name]
            np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6, err_msg=name)
        assert all(np.abs(grads[n]).max() > 0 for n in experts)


def _worker(ctx):
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(ep=2)
    for dispatcher, jit in CASES:
        _check(ctx, dims, dispatcher, jit)


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.models.test_gpt_moe_multirank:_worker", timeout=600)


@pytest.mark.parametrize("dispatcher, jit", CASES)
def test_ep2_gpt_model_equals_ep1_loss_and_gradients(job, dispatcher, jit):
    job.assert_ok(_tag(dispatcher, jit))
