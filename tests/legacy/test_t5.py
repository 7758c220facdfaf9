"""T5 (legacy/t5.py, models/t5.py) against transformers' T5ForConditionalGeneration, and the
encoder-decoder blocks it adds to mcore (relative position buckets, additive attention bias,
cross-attention masks), in one process.

Fixtures (``tests/make_t5_fixtures.py``): ``t5`` (ReLU MLP, tied head scaled by
``d_model ** -0.5``) and ``t5_v1_1`` (gated GELU, 3 decoder layers over 2 encoder layers, a
separate ``lm_head``); a padded encoder batch reaching the logarithmic buckets.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from legacy import t5  # noqa: E402
from mcore.fusions.attention import CoreAttention  # noqa: E402
from mcore.transformer.relative_position import relative_position_bucket  # noqa: E402
from models.safetensors_io import read_checkpoint  # noqa: E402
from models.t5 import greedy_generate, shift_right  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf"


@pytest.fixture(scope="module", params=["t5", "t5_v1_1"])
def loaded(request):
    path = FIXTURES / request.param
    return path, models.from_pretrained(path), dict(np.load(path / "reference.npz"))


def test_logits_loss_and_greedy_match_transformers(loaded):
    path, model, ref = loaded
    ids = ref["input_ids"].copy()
    assert (ref["attention_mask"][1, 8:] == 0).all() and (ids[1, 8:] == 0).all()
    ids[1, 8:] = 7  # other ids under the padding: the mask must hide them (encoder and cross)
    ids, mask = ms.Tensor(ids), ms.Tensor(ref["attention_mask"])
    dec, labels = ms.Tensor(ref["decoder_input_ids"]), ms.Tensor(ref["labels"])
    logits = model(ids, dec, mask).asnumpy()
    assert logits.shape == (2, 8, 256)
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-4)
    loss = float(model.loss(ids, dec, labels, mask).asnumpy())
    assert abs(loss - float(ref["loss"])) <= 1e-5 * abs(float(ref["loss"])), (loss, ref["loss"])
    greedy = greedy_generate(model, ref["input_ids"], ref["attention_mask"], max_new_tokens=5)
    np.testing.assert_array_equal(greedy, ref["greedy"][:, :5])


def test_save_pretrained_round_trip(loaded, tmp_path):
    path, model, _ = loaded
    model.save_pretrained(tmp_path)
    original, saved = read_checkpoint(path), read_checkpoint(tmp_path)
    assert set(saved) == set(original), sorted(set(saved) ^ set(original))
    for name, lazy in saved.items():
        np.testing.assert_array_equal(lazy.load(), original[name].load(), name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "t5"
    again = models.from_pretrained(tmp_path)
    assert again.tie_embeddings == model.tie_embeddings


def _bucket_numpy(rel, bidirectional, num_buckets, max_distance):
    """T5's bucket rule, written from its description, in float32 like the reference."""
    out = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0) * num_buckets
        dist = np.abs(rel)
    else:
        dist = np.maximum(-rel, 0)
    exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        log = np.log(dist.astype(np.float32) / np.float32(exact))
    large = exact + (log / np.float32(math.log(max_distance / exact))
                     * np.float32(num_buckets - exact)).astype(np.float32)
    large = np.minimum(np.where(dist < exact, 0, large).astype(np.int64), num_buckets - 1)
    return out + np.where(dist < exact, dist, large)


@settings(max_examples=25, deadline=None)
@given(bidirectional=st.booleans(), num_buckets=st.sampled_from([8, 16, 32]),
       max_distance=st.sampled_from([20, 64, 128]), offset=st.integers(-300, 300))
def test_relative_position_bucket_matches_numpy(bidirectional, num_buckets, max_distance, offset):
    rel = np.arange(-160, 160, dtype=np.int32) + offset
    got = relative_position_bucket(ms.Tensor(rel), bidirectional, num_buckets,
                                   max_distance).asnumpy()
    want = _bucket_numpy(rel.astype(np.int64), bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() < num_buckets


def test_core_attention_bias_and_cross_attention_padding():
    rng = np.random.default_rng(0)
    b, n, s, t, d = 2, 4, 3, 5, 8
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((b, n, s, d), (b, 2, t, d), (b, 2, t, d)))
    bias = rng.standard_normal((1, n, s, t)).astype(np.float32)
    key_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
    core = CoreAttention(n, 0.5, block_size=2, causal=False)  # two query blocks: bias rows split
    got = core(*map(ms.Tensor, (q, k, v, key_mask)), None, ms.Tensor(bias)).asnumpy()
    kk, vv = np.repeat(k, 2, 1), np.repeat(v, 2, 1)  # [b, 2, t, d] -> [b, n, t, d]
    scores = q @ kk.transpose(0, 1, 3, 2) * 0.5 + bias
    scores = np.where(key_mask[:, None, None, :] > 0, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ vv
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_shift_right_makes_decoder_inputs():
    labels = np.array([[5, 6, -100]])
    np.testing.assert_array_equal(shift_right(labels, 0), [[0, 5, 6]])
    np.testing.assert_array_equal(shift_right(np.array([[5, -100, 7]]), 0), [[0, 5, 0]])


BASE = {"model_type": "t5", "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
        "num_heads": 4, "vocab_size": 256}


@pytest.mark.parametrize("change,match", [
    ({"feed_forward_proj": "gated-relu"}, "feed_forward_proj='gated-relu'"),
    ({"is_decoder": True}, "is_decoder"),
    ({"is_encoder_decoder": False}, "is_encoder_decoder"),
])
def test_bad_config_names_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        t5.config_from_hf({**BASE, **change})


def test_config_mapping():
    cfg = t5.config_from_hf({**BASE, "feed_forward_proj": "gated-gelu", "num_decoder_layers": 3,
                             "tie_word_embeddings": False})
    assert (cfg.transformer.activation, cfg.num_decoder_layers) == ("geglu", 3)
    assert cfg.transformer.softmax_scale == 1.0 and not cfg.scale_decoder_outputs
    assert t5.config_from_hf(BASE).scale_decoder_outputs
    assert not t5.config_from_hf({**BASE, "scale_decoder_outputs": False}).scale_decoder_outputs
    with pytest.raises(ValueError, match="no pipeline stages"):
        from models.gpt import StageSpec
        models.build_from_config(BASE, stage=StageSpec(True, False, range(1)))
