"""generate(): batching of ragged prompts, sampling, stop tokens; from_pretrained errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from models.safetensors_io import read_checkpoint, write_checkpoint  # noqa: E402

LLAMA = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "llama"


@pytest.fixture(scope="module")
def model():
    return models.from_pretrained(LLAMA)


def test_ragged_batch_equals_prompts_alone(model):
    a, b = [5, 9, 200, 31, 7, 66], [77, 12, 3]
    together = models.generate(model, [a, b], max_new_tokens=2)
    assert together[0] == models.generate(model, [a], max_new_tokens=2)[0]
    assert together[1] == models.generate(model, [b], max_new_tokens=2)[0]


def test_compiled_generation_with_static_cache_matches_transformers(model):
    ref = np.load(LLAMA / "reference.npz")
    got = models.generate(model, ref["input_ids"], max_new_tokens=3, compiled=True)
    np.testing.assert_array_equal(np.array(got), ref["greedy"][:, :3])


def test_last_logits_is_the_last_row_of_the_logits(model):
    ids = ms.Tensor(np.array([[5, 9, 200, 31], [77, 12, 3, 4]], np.int32))
    mask = ms.Tensor(np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int32))
    full = model(ids, None, mask).asnumpy()  # [b, s, V]
    np.testing.assert_allclose(model.last_logits(ids, None, mask).asnumpy(), full[:, -1],
                               rtol=1e-5, atol=1e-5)


def test_compiled_default_equals_pynative(model):
    prompts = [[5, 9, 200, 31, 7, 66], [77, 12, 3]]  # ragged: left padding and a key mask
    eager = models.generate(model, prompts, 12, compiled=False)
    assert models.generate(model, prompts, 12) == eager  # compiled is the default
    assert all(len(set(row)) > 1 for row in eager)  # not a degenerate model
    stop = [eager[0][9], eager[1][3]]  # rows stop at different steps, after a stop check
    assert models.generate(model, prompts, 12, stop_tokens=stop) == \
        models.generate(model, prompts, 12, stop_tokens=stop, compiled=False)
    opts = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=11)
    assert models.generate(model, prompts, 6, **opts) == \
        models.generate(model, prompts, 6, compiled=False, **opts)


def test_compiled_steps_are_reused_within_a_size_bucket(model):
    from models.compiled_decode import bucket, decode_stats

    assert bucket(3, 5) == bucket(9, 20) == (16, 64) and bucket(17, 48) == (32, 128)
    models.generate(model, [[5, 9, 200]] * 2, 5)
    before = decode_stats(model)
    models.generate(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 2, 20)  # same bucket: no new graph
    assert decode_stats(model) == before
    models.generate(model, [list(range(1, 21))] * 2, 5)  # W = 32, same cache: one new prefill
    after = decode_stats(model)
    assert (after["graphs"], after["buckets"]) == (before["graphs"] + 1, before["buckets"])


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompt = [[5, 9, 200, 31]]
    greedy = models.generate(model, prompt, 2)
    assert models.generate(model, prompt, 2, do_sample=True, top_k=1, seed=3) == greedy
    s1 = models.generate(model, prompt, 2, do_sample=True, temperature=2.0, top_p=0.9, seed=7)
    s2 = models.generate(model, prompt, 2, do_sample=True, temperature=2.0, top_p=0.9, seed=7)
    assert s1 == s2


def test_stop_token_ends_that_prompt_only(model):
    ref = np.load(LLAMA / "reference.npz")
    greedy = ref["greedy"]
    stop = int(greedy[0, 1])
    out = models.generate(model, ref["input_ids"], 5, stop_tokens=[stop])
    assert out[0] == list(greedy[0, :2])
    row1 = list(greedy[1, :5])
    if stop in row1:
        row1 = row1[:row1.index(stop) + 1]
    assert out[1] == row1


def _copy(tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(LLAMA, target)
    return target


def test_unknown_model_type_is_named(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='bert'"):
        models.from_pretrained(d)


def test_missing_tensor_is_named(tmp_path):
    d = _copy(tmp_path)
    tensors = {k: v.load() for k, v in read_checkpoint(d).items()}
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    write_checkpoint(d, tensors)
    with pytest.raises(models.LoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        models.from_pretrained(d)


def test_shape_mismatch_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        models.from_pretrained(LLAMA, intermediate_size=96)


def test_unknown_override_and_truncated_file_are_named(tmp_path):
    with pytest.raises(KeyError, match="hiden_size"):
        models.from_pretrained(LLAMA, hiden_size=32)
    d = _copy(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        models.from_pretrained(d)
