"""One config path: the YAML builds the TransformerConfig directly (training.model_bridge), and for
every family config in configs/ the model equals the one the Hugging Face dict route builds
(the old bridge, still what a HF directory written from a YAML run holds): same architecture,
same parameter names, shapes and initial values, same logits. The YAML knobs reach the model."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from training.config import ConfigError, load_config
from training.model_bridge import FAMILIES, MODEL_TYPES, hf_config, transformer_config

ROOT = Path(__file__).resolve().parents[2]
# MoE configs (model.moe.num_experts > 0) have no Hugging Face dict form yet: the dense family
# files do not map model.moe (the Mixtral / Qwen3-MoE families will). Their model build is
# tested by tests/training/test_pretrain_moe.py; the check below keeps this list honest.
MOE_CONFIGS = ["tiny_moe_demo.yaml", "tiny_deepseek_v3_demo.yaml"]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name not in MOE_CONFIGS)
# Smaller layers keep the big bench config quick; the family choices are what is compared.
SHRINK = {"tiny_llama_bench.yaml": ["model.vocab_size=512", "model.hidden_size=64",
                                    "model.ffn_hidden_size=128", "model.seq_length=64"]}


def _comparable(tcfg) -> dict:
    """A TransformerConfig as a dict, without the one field that means nothing unscaled."""
    d = dataclasses.asdict(tcfg)
    if d["rotary"]["scaling"] == "none":  # the pre-extension length only matters when scaling
        d["rotary"].pop("original_max_position")
    return d


@pytest.fixture(scope="module")
def ms_cpu():
    import mindspore as ms

    ms.set_device("CPU")
    return ms


def test_only_moe_configs_are_left_out_of_the_hf_comparison():
    for name in MOE_CONFIGS:
        assert load_config(str(ROOT / "configs" / name)).model.moe.num_experts > 0, name
    for path in CONFIGS:
        assert load_config(str(path), SHRINK.get(path.name, [])).model.moe.num_experts == 0, path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_yaml_model_equals_the_hf_dict_model(path, ms_cpu):
    import models
    from models.hf import family_of
    from training.model_bridge import build_gpt

    cfg = load_config(str(path), SHRINK.get(path.name, []))
    hf = hf_config(cfg.model)
    assert hf["model_type"] == MODEL_TYPES[cfg.model.family]
    direct, via_hf = transformer_config(cfg), family_of(hf).config_from_hf(hf)
    assert _comparable(direct) == _comparable(via_hf)
    new, old = build_gpt(cfg), models.build_from_config(hf)
    assert new.hf.family is old.hf.family and new.hf.tie == old.hf.tie
    new_p = {n: p.asnumpy() for n, p in new.parameters_and_names()}
    old_p = {n: p.asnumpy() for n, p in old.parameters_and_names()}
    assert new_p.keys() == old_p.keys()
    for name, value in new_p.items():
        np.testing.assert_array_equal(value, old_p[name], err_msg=name)
    ids = ms_cpu.Tensor(np.arange(12, dtype=np.int32).reshape(2, 6) % cfg.model.vocab_size)
    np.testing.assert_array_equal(new(ids).asnumpy(), old(ids).asnumpy())


def test_family_choices_come_out():
    def tc(family):
        return transformer_config(load_config(None, [f"model.family={family}"]))

    assert tc("qwen3").attention.qk_norm and not tc("llama").attention.qk_norm
    assert tc("qwen2_5").attention.qkv_bias and not tc("qwen2_5").attention.out_bias
    glm = tc("glm4")
    assert (glm.rotary.fraction, glm.rotary.interleaved, glm.sandwich_norm,
            glm.attention.qkv_bias) == (0.5, True, True, True)
    assert tc("llama3_1").rotary.scaling == "llama3"
    tele = tc("telechat2")
    assert tele.attention.out_bias and tele.mlp_fc2_bias and not tele.attention.qkv_bias
    assert set(FAMILIES) == set(MODEL_TYPES)


def test_yaml_knobs_reach_the_transformer_config():
    cfg = load_config(None, ["model.num_layers=3", "model.recompute_layers=[0, 2]",
                             "model.attention_block_size=32", "model.head_dim=16",
                             "model.hidden_size=96", "model.num_heads=4", "model.num_kv_heads=2",
                             "training.dtype=fp16", "model.norm_eps=1e-6",
                             "model.rope_theta=5e5"])
    t = transformer_config(cfg)
    assert t.precision.recompute_layers == (0, 2)
    assert (t.precision.compute_dtype, t.precision.params_dtype) == ("float16", "float32")
    assert t.attention.block_size == 32 and t.head_dim == 16 and t.hidden_size == 96
    assert (t.norm_eps, t.rotary.base, t.num_query_groups) == (1e-6, 5e5, 2)
    assert transformer_config(load_config(None, ["model.recompute_layers=all"])) \
        .precision.recompute_layers == "all"
    assert transformer_config(load_config(None, [])).precision.recompute_layers == ()
    sp = load_config(None, ["parallel.sp=true", "parallel.tp=2"], world_size=2)
    assert transformer_config(sp).parallel.sequence_parallel


def test_sequence_parallel_config():
    """``parallel.sp`` with tp = 1 is off (Megatron's rule; the run logs a warning); the sequence
    must divide by tp; MoE with sp is refused; all naming the keys."""
    from training.pretrain import check_supported

    one = load_config(None, ["parallel.sp=true"])
    assert not transformer_config(one).parallel.sequence_parallel
    check_supported(one)
    with pytest.raises(ConfigError, match=r"^model.seq_length=30 is not divisible by parallel.tp "
                                          r"\(sequence parallel\)=4"):
        load_config(None, ["parallel.sp=true", "parallel.tp=4", "model.seq_length=30"],
                    world_size=4)
    moe = load_config(None, ["parallel.sp=true", "parallel.tp=2", "model.moe.num_experts=4"],
                      world_size=2)
    with pytest.raises(ConfigError, match=r"^parallel.sp=true: sequence parallelism with MoE"):
        check_supported(moe)


def test_knobs_reach_the_built_layers(ms_cpu):
    from training.model_bridge import build_gpt
    from training.pretrain import compute_dtype

    cfg = load_config(None, ["model.recompute_layers=[1]", "model.attention_block_size=16",
                             "training.dtype=float16"])
    model = build_gpt(cfg)
    recomputed = [getattr(layer, "_recompute_cell", None) is not None
                  for layer in model.decoder.layers]
    assert recomputed == [False, True]
    blocks = {c.block_size for _, c in model.cells_and_names() if hasattr(c, "block_size")}
    assert blocks == {16}
    assert compute_dtype(model) == "float16"  # what build_step hands to the TrainStep


def test_head_dim_is_exported_and_refused_where_the_family_has_none():
    cfg = load_config(None, ["model.family=qwen3", "model.head_dim=64"])
    assert hf_config(cfg.model)["head_dim"] == 64
    with pytest.raises(ConfigError, match="model.head_dim=8: model.family=telechat2"):
        transformer_config(load_config(None, ["model.family=telechat2", "model.head_dim=8"]))


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=12", "model.num_heads=4", "model.num_kv_heads=4"],
     "model.hidden_size=12 / model.num_heads=4 gives head_dim 3"),
    (["model.family=glm4", "model.hidden_size=24", "model.num_heads=4", "model.num_kv_heads=4"],
     "rotary part (6 * 0.5 for model.family=glm4)"),
    (["model.head_dim=5"], "model.head_dim=5 gives head_dim 5"),
])
def test_sizes_the_build_would_reject_name_the_keys(overrides, message):
    with pytest.raises(ConfigError) as info:
        transformer_config(load_config(None, overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_resume_may_change_the_execution_knobs(tmp_path):
    """recompute / attention block size change how a step runs, not the weights: a checkpoint
    saved without them (or with other values) resumes; a size change is still refused."""
    from training.checkpointing import CheckpointError, load_checkpoint, save_checkpoint

    saved = load_config(None, []).to_dict()["model"]
    del saved["recompute_layers"], saved["attention_block_size"]  # a checkpoint from before
    state = {"w": np.ones((2, 2), np.float32)}
    path = save_checkpoint(tmp_path, 1, state, {"adam_m.w": state["w"]}, {"config": {"model": saved}})
    now = load_config(None, ["model.recompute_layers=all", "model.attention_block_size=64"])
    assert load_checkpoint(path, expected_model_config=now.to_dict()["model"]).step == 1
    wider = load_config(None, ["model.hidden_size=256"]).to_dict()["model"]
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        load_checkpoint(path, expected_model_config=wider)


def test_hf_path_gives_the_directorys_model_with_the_yaml_knobs(ms_cpu, tmp_path, monkeypatch):
    """model.hf_path: architecture and weights of the directory (as models.from_pretrained),
    the knobs and dtype of the YAML; its sizes are checked at parse time."""
    import models
    from models.hf import load_weights
    from models.safetensors_io import read_checkpoint
    from training.model_bridge import build_gpt
    from training.pretrain import parse_args

    fixture = ROOT / "tests" / "fixtures" / "hf" / "llama"
    cfg = load_config(None, [f"model.hf_path={fixture}", "model.attention_block_size=8",
                             "model.recompute_layers=all"])
    model = build_gpt(cfg)
    load_weights(model, read_checkpoint(fixture))
    ref = models.from_pretrained(fixture)
    assert model.config.attention.block_size == 8 and model.config.precision.recompute_layers == "all"
    assert dataclasses.replace(model.config, attention=ref.config.attention,
                               precision=ref.config.precision) == ref.config
    ids = ms_cpu.Tensor(np.arange(10, dtype=np.int32).reshape(2, 5))
    np.testing.assert_allclose(model(ids).asnumpy(), ref(ids).asnumpy(), rtol=1e-5, atol=1e-6)

    monkeypatch.setenv("MS_WORKER_NUM", "3")  # 3 ranks: tp=3 splits nothing of the fixture
    small = ["model.num_heads=3", "model.num_kv_heads=3", "model.hidden_size=48",
             "model.ffn_hidden_size=48", "model.vocab_size=48", "training.global_batch_size=4"]
    with pytest.raises(ConfigError, match=r"parallel.tp=3: model.num_heads=4: must be divisible"):
        parse_args([f"model.hf_path={fixture}", "parallel.tp=3", *small])
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    odd = tmp_path / "odd_vocab"
    odd.mkdir()
    hf = json.loads((fixture / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**hf, "vocab_size": 255}))
    with pytest.raises(ConfigError, match=r"model.hf_path: vocab_size=255 .* parallel.tp=2"):
        parse_args([f"model.hf_path={odd}", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"model.hf_path: its 2 layers vs parallel.pp=2, "
                                          r"parallel.vpp=1"):
        parse_args([f"model.hf_path={fixture}", "parallel.pp=2", "model.num_layers=4",
                    "parallel.layers_per_stage=[3, 1]"])
    monkeypatch.setenv("MS_WORKER_NUM", "1")
    with pytest.raises(ConfigError, match="model.hf_path: cannot read"):
        parse_args([f"model.hf_path={tmp_path}"])
