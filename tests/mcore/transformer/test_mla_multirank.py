"""Multi-latent attention at tp=2 on two real ranks equals tp=1 (one launch).

Each rank builds one MLA layer twice from the same full weights: on a size-one group (the
single-process layer) and on the tp=2 group (its heads' shards of the up-projections and of
the output projection; the down-projections and latent norms replicated). Checks, with and
without ``q_lora_rank``, with and without sequence parallelism (PyNative; one case also under
``mindspore.jit``): the output, the input gradient and, after the gradient finaliser
(``mcore.distributed.finalize``), every weight gradient (split ones gathered over tp) equal
the tp=1 ones. A GPTModel with MLA then decodes through its latent cache at tp=2 with the
tp=1 logits and greedy tokens.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank

S2 = 6  # even: the sequence splits over tp=2 with sequence parallelism
CASES = [(12, False, "pynative"), (12, True, "pynative"), (None, False, "pynative"),
         (None, True, "pynative"), (12, False, "jit")]


def _name(q_lora, sp, mode):
    return f"{'q_lora' if q_lora else 'direct_q'}_sp{int(sp)}_{mode}"


def _gather(x, group):
    """Every rank's numpy array ``x``, stacked: [P, *x.shape]."""
    import mindspore as ms

    from mcore import comm

    return comm.all_gather(ms.Tensor(np.ascontiguousarray(x)[None]), group, 0).asnumpy()


def _grads(net, x, w, mode, dims):
    """(output, d x, {short name: finalised gradient}) of ``sum(net(x) * w)``."""
    import mindspore as ms

    from mcore.distributed.finalize import GradFinalizer, grad_plans
    from tests.mcore.tp_reference import loss_and_grads
    from training.step import tp_split_names

    out, dx, grads = loss_and_grads(net, x, w, mode)
    named = [(n, p) for n, p in net.parameters_and_names() if p.requires_grad]
    finalize = GradFinalizer(grad_plans(named, tp_split_names(net), dims), dims)
    final, _ = finalize(tuple(ms.Tensor(grads[n]) for n, _ in named))
    return out, dx, {n.split("attn.", 1)[1]: g.asnumpy() for (n, _), g in zip(named, final)}


def _check_layer(ctx, dims, q_lora, sp, mode):
    from mcore.parallel_state import ModelGroups
    from models.weights import split_dims
    from tests.mcore.tp_reference import assert_close
    from tests.mcore.transformer.mla_helpers import (B, H, full_weights, load_full, mla_config,
                                                     mla_net)

    g = dims.tp
    cfg = mla_config(q_lora_rank=q_lora, sequence_parallel=sp, qkv_bias=True)
    one_cfg = mla_config(q_lora_rank=q_lora, qkv_bias=True)
    ref_net = mla_net(one_cfg)
    weights = full_weights(ref_net)
    load_full(ref_net, weights)
    net = mla_net(cfg, ModelGroups(tp=g))
    load_full(net, weights, g)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, S2, H)).astype(np.float32)
    w = rng.standard_normal((B, S2, H)).astype(np.float32)
    ref_out, ref_dx, ref_grads = _grads(ref_net, x, w, "pynative", dims)
    if sp:  # outside the layer the sequence is split over tp
        x, w, ref_out, ref_dx = (np.split(a, g.size, 1)[g.rank] for a in (x, w, ref_out, ref_dx))
    dims_of = {n.split("attn.", 1)[1]: d for n, d in split_dims(net).items()}
    with ctx.check(f"layer_{_name(q_lora, sp, mode)}"):
        out, dx, grads = _grads(net, x, w, mode, dims)
        assert_close(out, ref_out, "output")
        assert_close(dx, ref_dx, "d input")
        assert sorted(grads) == sorted(ref_grads)
        flagged = {n.split("attn.", 1)[1] for n, p in net.parameters_and_names()
                   if getattr(p, "sequence_parallel", False)}
        replicated = {n for n in grads if dims_of.get(n) is None}
        split = set(grads) - replicated
        assert {"linear_kv_up_proj.weight", "linear_proj.weight"} <= split, split
        assert "linear_kv_down_proj.weight" in replicated and "kv_layernorm.weight" in replicated
        assert flagged == (replicated if sp else set()), (flagged, replicated)
        for name, grad in grads.items():
            dim = dims_of.get(name)
            full = grad if dim is None else np.concatenate(list(_gather(grad, g)), dim)
            assert_close(full, ref_grads[name], f"grad {name}")


def _check_decoding(ctx, dims):
    import mindspore as ms

    import models
    from mcore.parallel_state import ModelGroups, ProcessGroup
    from mcore.transformer.layer_specs import gpt_layer_specs
    from models.gpt import GPTModel
    from tests.mcore.transformer.mla_helpers import mla_config

    g = dims.tp
    cfg = mla_config(q_lora_rank=12)
    one = GPTModel(cfg, gpt_layer_specs(cfg), 64, groups=ModelGroups(tp=ProcessGroup.single("tp")))
    two = GPTModel(cfg, gpt_layer_specs(cfg), 64, groups=ModelGroups(tp=g))
    prompts = [[5, 9, 33, 31, 7, 60], [17, 12, 3]]
    with ctx.check("decoding_latent_cache_tp2"):
        ids = ms.Tensor(np.array([prompts[0]], np.int32))
        np.testing.assert_allclose(two(ids).asnumpy(), one(ids).asnumpy(), rtol=0, atol=1e-5)
        cache = two.new_cache()
        a = two(ids[:, :4], None, None, None, cache).asnumpy()
        b = two(ids[:, 4:], None, None, None, cache).asnumpy()
        np.testing.assert_allclose(np.concatenate([a, b], 1), one(ids).asnumpy(), rtol=0,
                                   atol=1e-5)
        want = models.generate(one, prompts, max_new_tokens=4, use_cache=False)
        assert models.generate(two, prompts, max_new_tokens=4) == want


def _worker(ctx):
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build(tp=2)
    for q_lora, sp, mode in CASES:
        _check_layer(ctx, dims, q_lora, sp, mode)
    _check_decoding(ctx, dims)


@pytest.fixture(scope="module")
def job():
    return run_ranks(2, "tests.mcore.transformer.test_mla_multirank:_worker", timeout=300,
                     stall_timeout=90)


@pytest.mark.parametrize("case", [_name(*c) for c in CASES])
def test_mla_tp2_equals_tp1(job, case):
    job.assert_ok(f"layer_{case}")


def test_mla_latent_decoding_tp2_equals_tp1(job):
    job.assert_ok("decoding_latent_cache_tp2")
