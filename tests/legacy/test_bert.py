"""BERT (legacy/bert.py, ``models.bert.BertModel``) against transformers' ``BertForMaskedLM``.

The fixture ``tests/fixtures/hf/bert`` (``tests/make_hf_fixtures.py --only bert``) holds a tiny
random checkpoint and transformers' MLM logits for a batch with three token types and a row
ending in three padding tokens (``attention_mask`` 0). Checked here, in one process: logits
within 1e-4 at every position (the padded row's real positions included, and its padding
positions, which transformers also computes from the real keys), padding keys hidden (changing
the padding tokens leaves the other positions unchanged), the defaults (no token types = type
0, no mask = all real), ``save_pretrained`` writing back exactly the original tensors, a
pre-training checkpoint (pooler, next-sentence head) loading with those ignored, the MLM loss
against a numpy cross-entropy, and config keys refused by name.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from legacy import bert  # noqa: E402
from models.safetensors_io import read_checkpoint  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "bert"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def model():
    return models.from_pretrained(FIXTURE)


def _run(model, ids, types=None, mask=None):
    wrap = (lambda a: None if a is None else ms.Tensor(a))  # noqa: E731
    return model(ms.Tensor(ids), wrap(types), wrap(mask)).asnumpy()


def test_logits_match_transformers(model, ref):
    got = _run(model, ref["input_ids"], ref["token_type_ids"], ref["attention_mask"])
    assert got.shape == (2, 8, 256)
    real = ref["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], ref["logits"][real], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=1e-4)  # padding positions too


def test_padding_keys_are_hidden_and_defaults(model, ref):
    ids, types, mask = ref["input_ids"], ref["token_type_ids"], ref["attention_mask"]
    base = _run(model, ids, types, mask)
    other = ids.copy()
    other[1, 5:] = [7, 8, 9]  # different tokens at the padding positions
    np.testing.assert_allclose(_run(model, other, types, mask)[1, :5], base[1, :5], rtol=0,
                               atol=1e-5)
    unmasked = _run(model, other, types, None)  # no mask: the padding tokens are attended
    assert np.abs(unmasked[1, :5] - base[1, :5]).max() > 1e-3
    np.testing.assert_allclose(unmasked, _run(model, other, types, np.ones_like(mask)), rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(_run(model, ids, None, mask), _run(model, ids, 0 * types, mask),
                               rtol=0, atol=1e-6)


def test_mlm_loss_matches_numpy(model, ref):
    ids, types, mask = ref["input_ids"], ref["token_type_ids"], ref["attention_mask"]
    labels = np.full(ids.shape, -100, np.int32)
    labels[0, [1, 4, 6]] = [5, 200, 17]
    labels[1, [0, 3]] = [255, 3]
    loss = float(model.mlm_loss(ms.Tensor(ids), ms.Tensor(labels), ms.Tensor(types),
                                ms.Tensor(mask)).asnumpy())
    z = ref["logits"].astype(np.float64)[labels != -100]  # [5, V]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    want = float((lse - z[np.arange(len(z)), labels[labels != -100]]).mean())
    assert abs(loss - want) <= 1e-5 * abs(want), (loss, want)


def test_save_pretrained_round_trip(model, ref, tmp_path):
    out = tmp_path / "saved"
    model.save_pretrained(out)
    original, saved = read_checkpoint(FIXTURE), read_checkpoint(out)
    assert set(saved) == set(original)
    for name, lazy in saved.items():
        np.testing.assert_array_equal(lazy.load(), original[name].load().astype(np.float32), name)
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    again = models.from_pretrained(out)
    args = (ref["input_ids"], ref["token_type_ids"], ref["attention_mask"])
    np.testing.assert_array_equal(_run(again, *args), _run(model, *args))


def test_pretraining_checkpoint_loads(model, ref, tmp_path):
    """A ``BertForPreTraining``-style file (pooler, next-sentence head, the tied decoder copies,
    the old ``position_ids`` buffer) loads strictly and gives the same logits."""
    from models.safetensors_io import write_checkpoint

    src = tmp_path / "pretraining"
    shutil.copytree(FIXTURE, src)
    tensors = {n: t.load().astype(np.float32) for n, t in read_checkpoint(src).items()}
    rng = np.random.default_rng(0)
    h = tensors["bert.embeddings.LayerNorm.weight"].shape[0]
    tensors.update({"bert.pooler.dense.weight": rng.normal(size=(h, h)).astype(np.float32),
                    "bert.pooler.dense.bias": np.zeros(h, np.float32),
                    "cls.seq_relationship.weight": rng.normal(size=(2, h)).astype(np.float32),
                    "cls.seq_relationship.bias": np.zeros(2, np.float32),
                    "cls.predictions.decoder.weight":
                        tensors["bert.embeddings.word_embeddings.weight"],
                    "cls.predictions.decoder.bias": tensors["cls.predictions.bias"],
                    "bert.embeddings.position_ids": np.arange(64, dtype=np.float32)[None]})
    write_checkpoint(src, tensors)
    args = (ref["input_ids"], ref["token_type_ids"], ref["attention_mask"])
    np.testing.assert_array_equal(_run(models.from_pretrained(src), *args), _run(model, *args))


def test_config_errors(tmp_path):
    hf = json.loads((FIXTURE / "config.json").read_text())
    for key, value in (("position_embedding_type", "relative_key"), ("is_decoder", True),
                       ("add_cross_attention", True), ("hidden_act", "swish"),
                       ("tie_word_embeddings", False)):
        with pytest.raises(ValueError, match=key):
            bert.config_from_hf({**hf, key: value})
    assert bert.config_from_hf({**hf, "position_embedding_type": "absolute"}).norm_eps == 1e-12
    with pytest.raises(ValueError, match="is_decoder"):
        models.from_pretrained(FIXTURE, is_decoder=True)
    bad = tmp_path / "relative"
    shutil.copytree(FIXTURE, bad)
    (bad / "config.json").write_text(json.dumps({**hf, "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        models.from_pretrained(bad)
