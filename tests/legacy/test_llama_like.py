"""The Llama-like legacy rows: Skywork (``model_type`` "skywork", Llama's names), Ziya and
Mengzi3 (plain ``llama`` checkpoints; MindFormers runs them from Llama YAMLs), YiZhao (a GLM-4
style ``chatglm`` config) and TeleChat v1 (``telechat``: base-model names, tied head,
NTK-raised RoPE base).

- Skywork: the parity-tested ``llama2`` fixture relabelled ``skywork`` gives transformers'
  logits (1e-4); a ``rope_scaling`` is refused by name.
- Ziya / Mengzi3 / Skywork MindFormers YAMLs (their public sizes): ``legacy.mindformers``
  derives the MLP width their Hugging Face checkpoints have (13824, 12288).
- YiZhao-12B: the ChatGLM keys of MindFormers' YiZhao YAML map through ``legacy.chatglm``
  (54 layers, 2 kv groups, qkv bias, ``padded_vocab_size`` 151552).
- TeleChat v1: the ``telechat`` fixture rewritten the v1 way (no ``transformer.`` prefix, no
  ``lm_head``, no ``tie_word_embeddings``, ``training_seqlen`` without ``base_seqlen``) gives
  exactly the logits of the TeleChat2 layout with the embedding copied into ``lm_head`` and
  ``rope_theta`` set to v1's base ``10000 * 3 ** (d / (d - 2))``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from legacy import chatglm, mindformers, skywork  # noqa: E402
from models import telechat  # noqa: E402
from models.safetensors_io import read_checkpoint, write_checkpoint  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf"


def _copy(src: Path, out: Path, config: dict, tensors: dict | None = None) -> Path:
    tensors = tensors or {n: t.load() for n, t in read_checkpoint(src).items()}
    write_checkpoint(out, tensors)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_skywork_is_the_llama_layer(tmp_path):
    config = json.loads((FIXTURES / "llama2" / "config.json").read_text())
    config.update(model_type="skywork", architectures=["SkyworkForCausalLM"])
    model = models.from_pretrained(_copy(FIXTURES / "llama2", tmp_path / "sky", config))
    ref = np.load(FIXTURES / "llama2" / "reference.npz")
    logits = model(ms.Tensor(ref["input_ids"])).asnumpy()
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="rope_scaling"):
        skywork.config_from_hf({**config, "rope_scaling": {"type": "ntk", "factor": 2.0}})


# model_config sizes of MindFormers' research YAMLs (run_ziya_13b, run_mengzi3_13b_910b,
# run_skywork_13b) and the intermediate_size of the matching Hugging Face checkpoints.
YAMLS = {"Ziya-LLaMA-13B": ({"hidden_size": 5120, "num_layers": 40, "num_heads": 40,
                             "vocab_size": 39424, "multiple_of": 256, "rms_norm_eps": 1e-6},
                            13824),
         "Mengzi3-13B": ({"hidden_size": 5120, "num_layers": 40, "num_heads": 40,
                          "vocab_size": 124792, "multiple_of": 256, "rms_norm_eps": 1e-5,
                          "extend_method": "None", "scaling_factor": 1.0}, 13824),
         "Skywork-13B": ({"hidden_size": 4608, "num_layers": 52, "num_heads": 36,
                          "vocab_size": 65519, "multiple_of": 256, "rms_norm_eps": 1e-6,
                          "extend_method": "None", "pretrain_seqlen": 4096,
                          "compute_in_2d": True}, 12288)}


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_mindformers_yamls_of_the_llama_like_rows(name):
    mc, ffn = YAMLS[name]
    conv = mindformers.config_from_yaml({"model": {"model_config": {"type": "LlamaConfig",
                                                                    **mc}}})
    hf = conv.config
    assert (hf["model_type"], hf["intermediate_size"]) == ("llama", ffn)
    assert (hf["vocab_size"], hf["rms_norm_eps"]) == (mc["vocab_size"], mc["rms_norm_eps"])
    assert hf["num_key_value_heads"] == mc["num_heads"] and "rope_scaling" not in hf
    assert conv.unknown_keys == []
    cfg = models.hf.family_of(hf).config_from_hf(hf)
    assert (cfg.ffn_hidden_size, cfg.num_query_groups, cfg.rotary.base) == (
        ffn, mc["num_heads"], 10000.0)


def test_yizhao_config_is_a_chatglm_config():
    """model_config keys of research/yizhao/yizhao_12b/predict_yizhao_12b.yaml (ChatGLM's
    config.json keys; its checkpoints load with the GLM remote code)."""
    hf = {"model_type": "chatglm", "num_layers": 54, "padded_vocab_size": 151552,
          "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
          "num_attention_heads": 32, "seq_length": 8192, "layernorm_epsilon": 1e-5,
          "rope_ratio": 1, "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
          "post_layer_norm": True, "add_bias_linear": False, "add_qkv_bias": True,
          "multi_query_attention": True, "multi_query_group_num": 2, "pre_seq_len": None}
    cfg = chatglm.config_from_hf(hf)
    assert (cfg.num_layers, cfg.num_query_groups, cfg.attention.qkv_bias) == (54, 2, True)
    assert (cfg.rotary.base, cfg.rotary.fraction, cfg.norm) == (10000.0, 0.5, "rmsnorm")
    assert (cfg.ffn_hidden_size, models.hf.vocab_size_of(hf)) == (13696, 151552)


def test_telechat_v1_layout_and_rope_base(tmp_path):
    v2 = json.loads((FIXTURES / "telechat" / "config.json").read_text())
    tensors = {n: t.load() for n, t in read_checkpoint(FIXTURES / "telechat").items()}
    d = v2["hidden_size"] // v2["n_head"]
    v1_base = 10000.0 * 3 ** (d / (d - 2))
    seven_b = {"model_type": "telechat", "n_layer": 30, "n_head": 32, "hidden_size": 4096,
               "ffn_hidden_size": 12288, "vocab_size": 160256, "training_seqlen": 8192,
               "embed_layernorm": False, "apply_residual_connection_post_layernorm": False}
    assert telechat.rope_base(seven_b) == 10000.0 * 3 ** (128 / 126)  # TeleChat-7B
    assert telechat.rope_base(v2) == 10000.0  # TeleChat2: base_seqlen == training_seqlen

    v1_tensors = {n.removeprefix("transformer."): t for n, t in tensors.items()
                  if n != "lm_head.weight"}
    v1_config = {k: v for k, v in v2.items() if k not in ("tie_word_embeddings", "base_seqlen")}
    v1 = models.from_pretrained(_copy(FIXTURES / "telechat", tmp_path / "v1", v1_config,
                                      v1_tensors))
    assert v1.tie_embeddings and v1.config.rotary.base == pytest.approx(v1_base)
    untied = dict(tensors, **{"lm_head.weight": tensors["transformer.word_embeddings.weight"]})
    same = {k: v for k, v in v2.items() if k not in ("training_seqlen", "base_seqlen")}
    ref = models.from_pretrained(_copy(FIXTURES / "telechat", tmp_path / "ref",
                                       {**same, "rope_theta": v1_base}, untied))
    ids = ms.Tensor(np.load(FIXTURES / "telechat" / "reference.npz")["input_ids"])
    np.testing.assert_allclose(v1(ids).asnumpy(), ref(ids).asnumpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="embed_layernorm"):
        telechat.config_from_hf({**seven_b, "embed_layernorm": True})
