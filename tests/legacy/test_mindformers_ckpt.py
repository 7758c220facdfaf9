"""MindFormers legacy ``.ckpt`` + YAML -> Hugging Face directory (``legacy.mindformers``).

The legacy checkpoint is written here with MindSpore's own ``save_checkpoint`` under
MindFormers' parameter names, from the ``llama2`` HF fixture's tensors (plus optimizer state and
a step counter, as a training run leaves them); its YAML describes the same model the
MindFormers way (``num_layers``, ``num_heads``, no ``n_kv_heads``, ``multiple_of`` and
``ffn_dim_multiplier`` instead of the MLP width, ``theta``). Converted and loaded, it must give
the logits of the model loaded from the HF names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

import models  # noqa: E402
from legacy import mindformers  # noqa: E402
from models.safetensors_io import read_checkpoint  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "llama2"
YAML = """\
model:
  model_config:
    type: LlamaConfig
    batch_size: 1
    seq_length: 256
    hidden_size: 64
    num_layers: 2
    num_heads: 4
    vocab_size: 256
    multiple_of: 64
    ffn_dim_multiplier: 0.75
    rms_norm_eps: 1.0e-5
    theta: 10000.0
    bos_token_id: 1
    eos_token_id: 2
    pad_token_id: 0
    compute_dtype: "float16"
    use_past: True
    my_custom_knob: 3
  arch:
    type: LlamaForCausalLM
"""


def _mindformers_name(hf: str) -> str:
    """The MindFormers name of a HF Llama tensor (the inverse of ``legacy.mindformers``)."""
    top = {v: k for k, v in mindformers._TOP.items()}
    if hf in top:
        return top[hf]
    layer = {v: k for k, v in mindformers._LAYER.items()}
    _, _, i, rest = hf.split(".", 3)  # model.layers.{i}.{module}.{kind}
    module, kind = rest.rsplit(".", 1)
    return f"model.layers.{i}.{layer[module]}.{kind}"


@pytest.fixture(scope="module")
def legacy_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mindformers")
    entries = []
    for name, lazy in read_checkpoint(FIXTURE).items():
        value = ms.Tensor(lazy.load().astype(np.float32))
        entries.append({"name": _mindformers_name(name), "data": value})
        if name.endswith("q_proj.weight"):  # optimizer state beside the weights
            entries.append({"name": "adam_m." + _mindformers_name(name), "data": value * 0})
    entries.append({"name": "global_step", "data": ms.Tensor(np.array([10], np.int32))})
    ms.save_checkpoint(entries, str(tmp / "llama2.ckpt"))
    (tmp / "run.yaml").write_text(YAML)
    return tmp


def test_ffn_size_follows_llamas_rule():
    assert mindformers.ffn_size({"hidden_size": 4096, "multiple_of": 256}) == 11008  # Llama 2 7B
    assert mindformers.ffn_size({"hidden_size": 8192, "multiple_of": 4096,
                                 "ffn_dim_multiplier": 1.3}) == 28672  # Llama 2 70B
    assert mindformers.ffn_size({"hidden_size": 64, "intermediate_size": 96}) == 96


def test_converted_checkpoint_gives_the_hf_models_logits(legacy_files, tmp_path):
    conv = mindformers.convert(legacy_files / "llama2.ckpt", legacy_files / "run.yaml",
                               tmp_path)
    assert conv.skipped_tensors == ["adam_m.model.layers.0.attention.wq.weight",
                                    "adam_m.model.layers.1.attention.wq.weight", "global_step"]
    assert conv.unknown_keys == ["my_custom_knob"]
    assert "compute_dtype" in conv.ignored_keys and "use_past" in conv.ignored_keys
    ref = np.load(FIXTURE / "reference.npz")
    ids = ms.Tensor(ref["input_ids"])
    converted = models.from_pretrained(tmp_path)
    original = models.from_pretrained(FIXTURE)
    assert converted.config == original.config
    np.testing.assert_array_equal(converted(ids).asnumpy(), original(ids).asnumpy())
    np.testing.assert_allclose(converted(ids).asnumpy(), ref["logits"], rtol=0, atol=1e-4)


def test_command_line_lists_what_it_skipped(legacy_files, tmp_path, capsys):
    assert mindformers.main([str(legacy_files / "llama2.ckpt"), str(legacy_files / "run.yaml"),
                             str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model_type=llama" in out and "global_step" in out and "my_custom_knob" in out


def test_unmapped_model_tensor_is_an_error():
    conv = mindformers.Conversion(config={})
    weights = {"model.layers.0.attention.w_qk.weight": ms.Tensor(np.zeros((3, 2), np.float32))}
    with pytest.raises(ValueError, match=r"no Hugging Face mapping: \['model.layers.0.attention"):
        mindformers.tensors_from_ckpt(weights, conv)


def _fuse(parts: list, blocks: int) -> np.ndarray:
    """MindFormers' qkv_concat layout, built independently: each of ``blocks`` tensor-parallel
    ranks concatenates its own row slice of every part; the checkpoint holds the ranks in order."""
    return np.concatenate([np.concatenate([np.array_split(p, blocks)[r] for p in parts])
                           for r in range(blocks)])


@pytest.mark.parametrize("blocks", [1, 2])
def test_fused_qkv_concat_tensors_split_into_the_unfused_ones(blocks):
    """GQA (4 heads, 2 kv heads of width 2) with q/k/v biases and a fused gate/up, fused as
    MindFormers does for ``blocks`` model-parallel ranks, split back exactly."""
    rng = np.random.default_rng(0)
    shapes = {"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8)}
    ref = {f"model.layers.0.self_attn.{k}.weight": rng.standard_normal(v).astype(np.float32)
           for k, v in shapes.items()}
    ref.update({f"model.layers.0.self_attn.{k}.bias": rng.standard_normal(v[0]).astype(np.float32)
                for k, v in shapes.items()})
    ref.update({f"model.layers.0.mlp.{k}.weight": rng.standard_normal((6, 8)).astype(np.float32)
                for k in ("gate_proj", "up_proj")})
    attn = [f"model.layers.0.self_attn.{k}_proj" for k in "qkv"]
    fused = {f"model.layers.0.attention.w_qkv.{kind}": _fuse([ref[f"{a}.{kind}"] for a in attn],
                                                              blocks)
             for kind in ("weight", "bias")}
    fused["model.layers.0.feed_forward.w_gate_hidden.weight"] = _fuse(
        [ref["model.layers.0.mlp.gate_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"]],
        blocks)
    doc = {"model": {"model_config": {"hidden_size": 8, "num_layers": 1, "num_heads": 4,
                                      "n_kv_heads": 2, "vocab_size": 16, "intermediate_size": 6,
                                      "qkv_has_bias": True, "qkv_concat": True}},
           "parallel_config": {"model_parallel": blocks}}
    conv = mindformers.config_from_yaml(doc)
    assert conv.fused_blocks == blocks and "qkv_concat" not in conv.unknown_keys
    mindformers.tensors_from_ckpt({k: ms.Tensor(v) for k, v in fused.items()}, conv)
    assert sorted(conv.tensors) == sorted(ref)
    for name, value in ref.items():
        np.testing.assert_array_equal(conv.tensors[name], value, err_msg=name)
    conv.fused_blocks = 3  # 8 query rows do not split into 3 blocks
    with pytest.raises(ValueError, match=r"attention.w_qkv.weight: 16 rows .* 3 block"):
        mindformers.tensors_from_ckpt({k: ms.Tensor(v) for k, v in fused.items()}, conv)


def test_fused_checkpoint_converts_to_the_unfused_fixture(legacy_files, tmp_path):
    """The llama2 fixture saved as a qkv_concat run with model_parallel 2 (fused per rank)
    converts to exactly the fixture's tensors; --fused-blocks overrides the YAML's count."""
    tensors = {n: lazy.load().astype(np.float32) for n, lazy in read_checkpoint(FIXTURE).items()}
    entries, fused_names = [], set()
    for i in range(2):
        p = f"model.layers.{i}."
        for mf, parts in (("attention.w_qkv", ["self_attn.q_proj", "self_attn.k_proj",
                                               "self_attn.v_proj"]),
                          ("feed_forward.w_gate_hidden", ["mlp.gate_proj", "mlp.up_proj"])):
            value = _fuse([tensors[f"{p}{part}.weight"] for part in parts], 2)
            entries.append({"name": f"{p}{mf}.weight", "data": ms.Tensor(value)})
            fused_names.update(f"{p}{part}.weight" for part in parts)
    entries += [{"name": _mindformers_name(n), "data": ms.Tensor(v)}
                for n, v in tensors.items() if n not in fused_names]
    ms.save_checkpoint(entries, str(tmp_path / "fused.ckpt"))
    (tmp_path / "run.yaml").write_text(YAML.replace("    my_custom_knob: 3\n",
                                                    "    qkv_concat: True\n")
                                       + "parallel_config:\n  model_parallel: 2\n")
    conv = mindformers.convert(tmp_path / "fused.ckpt", tmp_path / "run.yaml", tmp_path / "hf")
    assert conv.unknown_keys == [] and conv.fused_blocks == 2
    out = read_checkpoint(tmp_path / "hf")
    assert sorted(out) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(out[name].load(), value, err_msg=name)
    assert mindformers.main([str(tmp_path / "fused.ckpt"), str(tmp_path / "run.yaml"),
                             str(tmp_path / "one_block"), "--fused-blocks", "1"]) == 0
    q = read_checkpoint(tmp_path / "one_block")["model.layers.0.self_attn.q_proj.weight"].load()
    assert not np.array_equal(q, tensors["model.layers.0.self_attn.q_proj.weight"])


def test_yaml_mapping_of_bias_and_rope_scaling():
    base = {"hidden_size": 64, "num_layers": 1, "num_heads": 4, "vocab_size": 32,
            "intermediate_size": 128}
    conv = mindformers.config_from_yaml({"model": {"model_config": dict(
        base, n_kv_heads=2, qkv_has_bias=True, extend_method="PI", scaling_factor=4.0)}})
    assert conv.config["model_type"] == "qwen2" and conv.config["num_key_value_heads"] == 2
    assert conv.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(ValueError, match="extend_method='NTK'"):
        mindformers.config_from_yaml({"model": {"model_config": dict(base, extend_method="NTK")}})
    with pytest.raises(ValueError, match="model.model_config.num_layers is missing"):
        mindformers.config_from_yaml({"model": {"model_config": {"hidden_size": 8}}})
