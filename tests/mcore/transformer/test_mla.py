"""Multi-latent attention (one process): forward and backward against an independent float64
numpy reference (interleaved rotary, YaRN frequencies and mscale), latent-cache decoding
against full recompute, the latent cache's size, and the errors for MLA sizes that do not fit.

The tp=2 checks (outputs and every gradient equal to tp=1, with and without sequence
parallelism) are in ``test_mla_multirank.py``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mcore.transformer.config import (MLAConfig, RotaryConfig,  # noqa: E402
                                      TransformerConfig)
from tests.mcore.transformer.mla_helpers import (B, H, S, full_weights,  # noqa: E402
                                                 load_full, mla_config, mla_net, reference_mla)
from tests.ms_helpers import WeightedSum  # noqa: E402

VARIANTS = {  # name -> mla_config kwargs
    "q_lora_yarn": dict(q_lora_rank=12, qkv_bias=True),
    "direct_q_yarn": dict(q_lora_rank=None),
    "q_lora_plain_rope": dict(q_lora_rank=12, scaling="none"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request):
    cfg = mla_config(**VARIANTS[request.param])
    net = mla_net(cfg)
    weights = full_weights(net)
    load_full(net, weights)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, S, H)).astype(np.float32)
    w = rng.standard_normal((B, S, H)).astype(np.float32)
    return request.param, cfg, net, weights, x, w


def test_forward_matches_numpy_reference(case):
    _, cfg, net, weights, x, _ = case
    got = net(ms.Tensor(x)).asnumpy()
    ref = reference_mla(x, weights, cfg)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_backward_matches_reference_directional_derivatives(case):
    """d/dε of ``sum(ref(x + ε u) * w)`` (central differences of the float64 reference) equals
    ``<grad, u>`` for the input and for every parameter, three random directions each."""
    name, cfg, net, weights, x, w = case
    params = [p for p in net.get_parameters() if p.requires_grad]
    names = [n.split("attn.", 1)[1] for n, p in net.parameters_and_names() if p.requires_grad]
    fn = ms.grad(WeightedSum(net), grad_position=0, weights=params)
    dx, dws = fn(ms.Tensor(x), ms.Tensor(w))
    grads = {"x": dx.asnumpy(), **{n: g.asnumpy() for n, g in zip(names, dws)}}
    assert set(grads) - {"x"} == set(weights), (sorted(grads), sorted(weights))
    rng = np.random.default_rng(2)
    eps = 1e-4
    w64 = w.astype(np.float64)
    for key, g in grads.items():
        for _ in range(3):
            u = rng.standard_normal(g.shape)
            plus, minus = dict(weights), dict(weights)
            if key == "x":
                lp = (reference_mla(x + eps * u, weights, cfg) * w64).sum()
                lm = (reference_mla(x - eps * u, weights, cfg) * w64).sum()
            else:
                plus[key] = weights[key] + eps * u
                minus[key] = weights[key] - eps * u
                lp = (reference_mla(x, plus, cfg) * w64).sum()
                lm = (reference_mla(x, minus, cfg) * w64).sum()
            numeric = (lp - lm) / (2 * eps)
            analytic = float((g.astype(np.float64) * u).sum())
            tol = 1e-4 * (np.abs(g).sum() * np.abs(u).max() + 1e-3)
            assert abs(analytic - numeric) <= tol, (name, key, analytic, numeric)


def test_softmax_scale_and_rotary_dims_follow_deepseek():
    cfg = mla_config()
    m = 0.1 * 0.8 * np.log(4.0) + 1.0  # mscale(factor=4, mscale_all_dim=0.8)
    assert cfg.head_dim == 10 and cfg.rotary_dim == 4
    assert cfg.softmax_scale == pytest.approx(10 ** -0.5 * m * m, rel=1e-12)
    assert mla_config(scaling="none").softmax_scale == pytest.approx(10 ** -0.5, rel=1e-12)


# ----- latent-cache decoding ------------------------------------------------------------------

def _gpt(q_lora_rank):
    from mcore.transformer.layer_specs import gpt_layer_specs
    from models.gpt import GPTModel

    cfg = mla_config(q_lora_rank=q_lora_rank)
    model = GPTModel(cfg, gpt_layer_specs(cfg), 64)
    rng = np.random.default_rng(3)
    for _, p in model.parameters_and_names():  # larger weights: attention matters for tokens
        p.set_data(ms.Tensor(p.asnumpy() + rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    return model


@pytest.fixture(scope="module", params=[12, None], ids=["q_lora", "direct_q"])
def gpt(request):
    return _gpt(request.param)


def test_latent_cache_logits_equal_full_recompute(gpt):
    from mcore.transformer.latent_cache import LatentKVCache

    ids = np.random.default_rng(4).integers(0, 64, (2, 9)).astype(np.int32)
    full = gpt(ms.Tensor(ids)).asnumpy()
    cache = gpt.new_cache()
    assert isinstance(cache, LatentKVCache)
    parts = [gpt(ms.Tensor(ids[:, a:b]), None, None, None, cache).asnumpy()
             for a, b in ((0, 5), (5, 6), (6, 7), (7, 9))]
    np.testing.assert_allclose(np.concatenate(parts, 1), full, rtol=0,
                               atol=2e-5 * np.abs(full).max())
    assert cache.length == 9 and cache.keys[0].shape == (2, 1, 9, 10 + 4)


def test_latent_cache_greedy_tokens_equal_full_recompute(gpt):
    import models

    prompts = [[5, 9, 33, 31, 7, 60], [17, 12, 3]]  # ragged: left padding and a key mask
    ref = models.generate(gpt, prompts, max_new_tokens=6, use_cache=False)
    assert models.generate(gpt, prompts, max_new_tokens=6) == ref
    assert models.generate(gpt, prompts, max_new_tokens=6, compiled=True) == ref
    assert len({tuple(r) for r in ref}) == 2 and len(set(ref[0])) > 1  # not a degenerate model


def test_full_kv_cache_also_works_with_mla(gpt):
    """A plain ``KVCache`` (expanded per-head keys and values) gives the same logits: the
    reference the benchmark compares the latent cache with."""
    from mcore.transformer.kv_cache import KVCache

    ids = np.random.default_rng(5).integers(0, 64, (1, 6)).astype(np.int32)
    full = gpt(ms.Tensor(ids)).asnumpy()
    cache = KVCache(gpt.layer_range)
    a = gpt(ms.Tensor(ids[:, :4]), None, None, None, cache).asnumpy()
    b = gpt(ms.Tensor(ids[:, 4:]), None, None, None, cache).asnumpy()
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, rtol=0,
                               atol=2e-5 * np.abs(full).max())
    assert cache.keys[0].shape == (1, 4, 6, 10) and cache.values[0].shape == (1, 4, 6, 5)


def test_latent_cache_bytes_per_token():
    from mcore.transformer.latent_cache import latent_cache_bytes_per_token

    assert latent_cache_bytes_per_token(512, 64, 61) == 576 * 61 * 4


# ----- errors ----------------------------------------------------------------------------------

BASE = dict(num_layers=1, hidden_size=16, num_attention_heads=4, ffn_hidden_size=8,
            multi_latent_attention=True)
MLA = dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4)


@pytest.mark.parametrize("changes, key", [
    (dict(kv_lora_rank=None), "mla.kv_lora_rank"),
    (dict(kv_lora_rank=0), "mla.kv_lora_rank"),
    (dict(q_lora_rank=-3), "mla.q_lora_rank"),
    (dict(qk_nope_head_dim=0), "mla.qk_nope_head_dim"),
    (dict(v_head_dim=-1), "mla.v_head_dim"),
    (dict(qk_rope_head_dim=3), "mla.qk_rope_head_dim"),
    (dict(latent_norm_eps=0.0), "mla.latent_norm_eps"),
])
def test_bad_mla_sizes_name_the_key(changes, key):
    with pytest.raises(ValueError) as err:
        TransformerConfig(**BASE, mla=MLAConfig(**{**MLA, **changes}))
    assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value)


def test_head_dim_must_match_mla_and_heads_must_divide_tp():
    with pytest.raises(ValueError, match=r"^head_dim=7: must be None or mla.qk_head_dim=6"):
        TransformerConfig(**BASE, head_dim=7, mla=MLAConfig(**MLA))
    cfg = TransformerConfig(**BASE, mla=MLAConfig(**MLA))
    with pytest.raises(ValueError, match=r"^num_attention_heads=4: must be divisible by tensor "
                                         r"parallel size 3"):
        cfg.check_tp(3)


def test_mla_layer_needs_the_flag():
    from mcore.transformer.layer_specs import mla_attention_spec
    from mcore.transformer.spec import build_module

    cfg = dataclasses.replace(mla_config(), multi_latent_attention=False)
    with pytest.raises(ValueError, match="multi_latent_attention=False"):
        build_module(mla_attention_spec(cfg), cfg)


def test_latent_cache_refuses_plain_update():
    from mcore.transformer.latent_cache import LatentKVCache

    with pytest.raises(TypeError, match="update_latent"):
        LatentKVCache(1).update(0, None, None)


def test_rotary_fraction_is_not_checked_for_mla():
    cfg = TransformerConfig(**BASE, mla=MLAConfig(**MLA), rotary=RotaryConfig(fraction=0.3))
    assert cfg.rotary_dim == 2
