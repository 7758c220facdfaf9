"""DeepSeek-V3 / V2 families beyond the parity fixtures (tests/models/test_hf_parity.py):
the latent KV cache is what generation uses, the MTP layer of a V3 checkpoint (layer
``num_hidden_layers``) is ignored without ``use_mtp`` and loaded with it (dense or MoE), and
bad keys stop with one error naming the key."""
from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

import models
from mcore.transformer.latent_cache import LatentKVCache
from models.hf import build_from_config, read_config
from models.safetensors_io import read_checkpoint

ms.set_device("CPU")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf"


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_generation_uses_the_latent_cache(family):
    model = models.from_pretrained(FIXTURES / family)
    assert isinstance(model.new_cache(), LatentKVCache)
    assert model.mtp is None
    table = model.hf.family.weight_table(model.config, model.hf.tie)
    assert ("decoder.layers.1.mlp.router.expert_bias" in table
            and bool(table["decoder.layers.1.mlp.router.expert_bias"]) == (family == "deepseek_v3"))


def test_fewer_layers_than_the_checkpoint_is_still_refused():
    """Only the MTP layer (it has eh_proj) is skipped: a surplus decoder layer is an error."""
    with pytest.raises(models.LoadError, match=r"'model\.layers\.2\..*num_hidden_layers=2"):
        models.from_pretrained(FIXTURES / "deepseek_v3", num_hidden_layers=2)
    assert models.from_pretrained(FIXTURES / "deepseek_v3", strict=False,
                                  num_hidden_layers=2).config.num_layers == 2


def test_v3_moe_mtp_layer_loads():
    """The fixture's MTP layer (layer 3, past first_k_dense_replace=1) is MoE: use_mtp loads
    every tensor of it strictly (experts, router, correction bias, shared experts); the main
    model's logits do not change, and loss_terms adds the depth's routing as row 2 (layer 3)."""
    plain = models.from_pretrained(FIXTURES / "deepseek_v3")
    model = models.from_pretrained(FIXTURES / "deepseek_v3", use_mtp=True)
    depth = model.mtp.layers[0]
    assert depth.is_moe and model.moe_layers == (1, 2, 3)
    stored = read_checkpoint(FIXTURES / "deepseek_v3")
    np.testing.assert_array_equal(depth.layer.mlp.router.expert_bias.asnumpy(),
                                  stored["model.layers.3.mlp.gate.e_score_correction_bias"]
                                  .load().astype(np.float32))
    np.testing.assert_array_equal(depth.layer.mlp.router.weight.asnumpy(),
                                  stored["model.layers.3.mlp.gate.weight"].load()
                                  .astype(np.float32))
    ids = np.array([[5, 9, 17, 33, 2, 8, 4]], np.int32)
    np.testing.assert_array_equal(plain(ms.Tensor(ids)).asnumpy(), model(ms.Tensor(ids)).asnumpy())
    _, _, aux, counts, mtp = model.loss_terms(ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:]))
    top_k = model.config.moe.top_k
    assert aux.shape[0] == 3 and counts.asnumpy()[2].sum() == 6 * top_k
    assert np.isfinite(mtp.asnumpy()).all()


def test_moe_mtp_layer_round_trip(tmp_path):
    """save_pretrained writes a MoE MTP depth as layer num_hidden_layers under DeepSeek's
    names; use_mtp loads it back exactly (logits, MTP loss and routing equal)."""
    hf = {**read_config(FIXTURES / "deepseek_v3"), "use_mtp": True}
    model = build_from_config(hf)
    assert model.mtp.layers[0].is_moe
    model.save_pretrained(tmp_path)
    names = set(read_checkpoint(tmp_path))
    for part in ("eh_proj", "mlp.gate", "mlp.experts.0.down_proj", "mlp.shared_experts.up_proj"):
        assert f"model.layers.3.{part}.weight" in names, part
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in names
    again = models.from_pretrained(tmp_path)
    mine = dict(model.parameters_and_names())
    for name, param in again.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), mine[name].asnumpy(), err_msg=name)
    ids = np.array([[5, 9, 17, 33, 2, 8, 4]], np.int32)
    x, y = ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:])
    mine, theirs = model.loss_terms(x, y), again.loss_terms(x, y)  # same weights, same numbers
    for i in (0, 1, 2, 4):  # loss, lm_loss, aux, mtp (CPU reductions: float rounding only)
        np.testing.assert_allclose(theirs[i].asnumpy(), mine[i].asnumpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(theirs[3].asnumpy(), mine[3].asnumpy())  # routing: exact
    np.testing.assert_allclose(again(x).asnumpy(), model(x).asnumpy(), rtol=1e-6, atol=1e-6)


def test_use_mtp_on_another_family_is_refused():
    with pytest.raises(KeyError, match=r"use_mtp.*model_type='llama'"):
        models.from_pretrained(FIXTURES / "llama", use_mtp=True)


def test_mtp_requested_without_mtp_layers_names_the_key():
    hf = read_config(FIXTURES / "deepseek_v3")
    with pytest.raises(ValueError, match=r"num_nextn_predict_layers=0"):
        build_from_config({**hf, "use_mtp": True, "num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match=r"^use_mtp=True: DeepSeek-V2"):
        build_from_config({**read_config(FIXTURES / "deepseek_v2"), "use_mtp": True})


@pytest.mark.parametrize("key, value", [("topk_group", 3), ("topk_method", "best"),
                                        ("scoring_func", "tanh"), ("attention_bias", True)])
def test_bad_keys_are_named(key, value):
    hf = read_config(FIXTURES / "deepseek_v3")
    with pytest.raises(ValueError, match=rf"^{key}="):
        build_from_config({**hf, key: value})


def test_dense_mtp_layer_round_trip(tmp_path):
    """A V3 config whose MTP layer is dense (moe_layer_freq=2: layer 2 MoE, 3 dense):
    save_pretrained writes the MTP layer as layer num_hidden_layers under DeepSeek's names; use_mtp loads it
    back exactly; without use_mtp strict loading ignores it."""
    hf = {**read_config(FIXTURES / "deepseek_v3"), "moe_layer_freq": 2, "use_mtp": True}
    model = build_from_config(hf)
    assert model.mtp is not None and model.config.is_moe_layer(2)
    model.save_pretrained(tmp_path)
    names = set(read_checkpoint(tmp_path))
    for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.kv_b_proj",
                 "mlp.down_proj", "input_layernorm"):
        assert f"model.layers.3.{part}.weight" in names, part
    again = models.from_pretrained(tmp_path)
    mine = dict(model.parameters_and_names())
    for name, param in again.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), mine[name].asnumpy(), err_msg=name)
    assert again.mtp is not None  # use_mtp was saved in config.json
    config = json.loads((tmp_path / "config.json").read_text())
    config["use_mtp"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = models.from_pretrained(tmp_path)  # strict: the MTP layer's tensors are ignored
    assert plain.mtp is None
    ids = np.array([[5, 9, 17, 33, 2, 8]], np.int32)
    np.testing.assert_array_equal(plain(ms.Tensor(ids)).asnumpy(),
                                  again(ms.Tensor(ids)).asnumpy())
