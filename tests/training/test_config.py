"""Config: YAML + dotted overrides, derived sizes, and one-line errors that name the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from training.config import (SECTIONS, Config, ConfigError, all_keys, load_config, parse_cli,
                             schema_markdown, schema_rows)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _error(overrides, world_size=1, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, world_size=world_size)
    msg = str(info.value)
    assert "\n" not in msg and msg, msg
    return msg


def test_defaults_and_overrides_and_derived():
    cfg = load_config(None, ["parallel.tp=2", "training.train_iters=50", "optimizer.lr=3e-4",
                             "parallel.sp=true", "checkpoint.load=auto", "data.tokenizer=null"],
                      world_size=4)
    assert cfg.parallel.tp == 2 and cfg.parallel.sp is True
    assert cfg.training.train_iters == 50
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.parallel.dp == 2 and cfg.parallel.world_size == 4
    assert cfg.training.grad_accum_steps == cfg.training.global_batch_size // (cfg.training.micro_batch_size * 2)
    assert cfg.checkpoint.dir == "runs/demo/checkpoints"


def test_to_dict_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=2"])
    d = cfg.to_dict()
    assert set(d) == set(SECTIONS) and d["model"]["hidden_size"] == 64
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    assert load_config(str(p)).to_dict() == d


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(str(path), world_size=1)
    assert isinstance(cfg, Config)
    assert cfg.model.seq_length <= cfg.model.max_position_embeddings


def test_family_configs_exist():
    names = {p.name for p in CONFIGS}
    for fam in ("llama3_1", "qwen2_5", "qwen3", "glm4", "telechat2"):
        assert f"{fam}_small.yaml" in names
    assert {"tiny_llama_demo.yaml", "tiny_llama_bench.yaml"} <= names
    bench = load_config(str(ROOT / "configs/tiny_llama_bench.yaml")).model
    assert (bench.vocab_size, bench.hidden_size, bench.num_layers, bench.num_heads, bench.num_kv_heads,
            bench.ffn_hidden_size, bench.seq_length) == (32000, 512, 4, 8, 2, 1408, 256)


def test_unknown_key_suggests_the_right_one():
    assert _error(["training.trian_iters=5"]) == \
        "unknown key 'training.trian_iters' (did you mean 'training.train_iters'?)"
    assert "'trainig.seed'" in _error(["trainig.seed=1"])
    assert "'model.hidden_size.x'" in _error(["model.hidden_size.x=1"])
    assert "'parallel'" in _error(["parallel=2"])
    assert "not of the form" in _error(["parallel.tp"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  train_iters: 5\n  warmup: 3\n")
    assert "'training.warmup'" in _error([], path=str(p))
    p.write_text("optimiser:\n  lr: 1\n")
    assert "unknown key 'optimiser' (did you mean 'optimizer'?)" == _error([], path=str(p))
    assert "does not exist" in _error([], path=str(tmp_path / "nope.yaml"))


def test_derived_fields_must_agree():
    assert "parallel.dp" in _error(["parallel.dp=3"], world_size=2)
    load_config(None, ["parallel.dp=2"], world_size=2)
    assert "training.grad_accum_steps" in _error(["training.grad_accum_steps=7"])


@pytest.mark.parametrize("overrides,world,key", [
    (["parallel.tp=3"], 4, "parallel.tp"),
    (["parallel.pp=3"], 4, "parallel.pp"),
    (["parallel.cp=3"], 4, "parallel.cp"),
    (["parallel.ep=3"], 4, "parallel.ep"),
    (["parallel.tp=2", "model.num_heads=6", "model.num_kv_heads=3", "model.hidden_size=96"], 2, "model.num_kv_heads"),
    (["parallel.tp=4", "model.num_heads=6", "model.num_kv_heads=6", "model.hidden_size=96"], 4, "model.num_heads"),
    (["parallel.pp=2", "model.num_layers=3"], 2, "model.num_layers"),
    (["parallel.pp=2", "parallel.vpp=2", "model.num_layers=6"], 2, "model.num_layers"),
    (["parallel.vpp=2"], 1, "parallel.vpp"),
    (["training.global_batch_size=12"], 2, "training.global_batch_size"),
    (["model.hidden_size=130"], 1, "model.hidden_size"),
    (["model.num_kv_heads=3"], 1, "model.num_heads"),
    (["model.seq_length=512"], 1, "model.seq_length"),
    (["optimizer.min_lr=1.0"], 1, "optimizer.min_lr"),
    (["training.micro_batch_size=0"], 1, "training.micro_batch_size"),
    (["optimizer.beta2=1.0"], 1, "optimizer.beta2"),
])
def test_sizes_that_do_not_divide_name_the_key(overrides, world, key):
    assert key in _error(overrides, world_size=world)


MOE = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_moe_demo.yaml")


@pytest.mark.parametrize("overrides,world,expect", [
    (["parallel.ep=3"], 3, "model.moe.num_experts=4 is not divisible by parallel.ep=3"),
    (["model.moe.top_k=5"], 1, "model.moe.top_k=5 exceeds model.moe.num_experts=4"),
    (["model.moe.num_groups=2", "model.moe.group_topk=3"], 1,
     "model.moe.group_topk=3 must be in [1, model.moe.num_groups=2]"),
    (["model.moe.num_groups=3", "model.moe.group_topk=1"], 1,
     "model.moe.num_experts=4 is not divisible by model.moe.num_groups=3"),
    (["parallel.ep=2", "parallel.pp=2"], 2,
     "world size 2 is not divisible by parallel.etp*parallel.ep*parallel.pp=1*2*2=4"),
    (["parallel.ep=2", "parallel.etp=2"], 2, "parallel.etp*parallel.ep*parallel.pp=2*2*1=4"),
    (["model.moe.capacity_factor=0"], 1, "model.moe.capacity_factor must be > 0"),
    (["model.moe.capacity_factor=-1.5"], 1, "model.moe.capacity_factor must be > 0"),
    (["model.moe.first_k_dense=4"], 1, "model.moe.first_k_dense=4 exceeds model.num_layers=3"),
    (["model.moe.topk=1"], 1, "unknown key 'model.moe.topk' (did you mean 'model.moe.top_k'?)"),
    (["model.moe=3"], 1, "key 'model.moe' must be a mapping of fields, got int"),
    (["model.moe.dispatcher=mpi"], 1, "model.moe.dispatcher: expected one of allgather|alltoall"),
    (["model.moe.num_experts=0", "parallel.ep=2"], 2, "expert parallelism needs MoE layers"),
    (["model.moe.ffn_hidden_size=6", "parallel.etp=4"], 4,
     "model.moe.ffn_hidden_size=6 is not divisible by parallel.etp=4"),
    (["model.moe.ffn_hidden_size=null", "model.ffn_hidden_size=30", "parallel.etp=4"], 4,
     "model.moe.ffn_hidden_size (null: model.ffn_hidden_size)=30 is not divisible by "
     "parallel.etp=4"),
    (["model.moe.shared_ffn_hidden_size=5", "parallel.tp=2"], 2,
     "model.moe.shared_ffn_hidden_size=5 is not divisible by parallel.tp=2"),
    (["model.moe.topk_method=noaux_tc"], 1,
     "model.moe.topk_method=noaux_tc needs model.moe.num_groups > 0"),
    (["model.moe.topk_method=greedy", "model.moe.num_groups=2", "model.moe.group_topk=1"], 1,
     "model.moe.topk_method=greedy takes no groups"),
    (["model.moe.topk_method=best"], 1, "model.moe.topk_method: expected one of"),
    (["model.moe.routed_scaling_factor=0"], 1, "model.moe.routed_scaling_factor must be > 0"),
])
def test_moe_section_and_expert_parallel_errors_are_one_line(overrides, world, expect):
    msg = _error(overrides, path=MOE, world_size=world)
    assert expect in msg and "\n" not in msg


@pytest.mark.parametrize("overrides,path,expect", [
    (["optimizer.distributed=true"], MOE, "optimizer.distributed=true with model.moe.num_experts=4"),
    (["optimizer.bucket_size=0"], None, "optimizer.bucket_size must be >= 1, got 0"),
    (["optimizer.distributed=2"], None, "optimizer.distributed: expected bool, got int 2"),
])
def test_distributed_optimizer_errors_are_one_line(overrides, path, expect):
    assert expect in _error(overrides, path=path, world_size=2)


def test_distributed_optimizer_config():
    cfg = load_config(None, ["optimizer.distributed=true", "optimizer.bucket_size=1000"], world_size=2)
    assert cfg.optimizer.distributed is True and cfg.optimizer.bucket_size == 1000
    assert load_config(None).optimizer.distributed is False


def test_moe_section_maps_onto_moe_config():
    from training.model_bridge import moe_config

    cfg = load_config(MOE, ["parallel.ep=2", "model.moe.capacity_factor=1.5",
                           "training.micro_batch_size=4"], world_size=4)
    assert (cfg.parallel.ep, cfg.parallel.etp, cfg.parallel.dp) == (2, 1, 4)
    moe = moe_config(cfg)
    assert (moe.num_experts, moe.top_k, moe.ffn_hidden_size) == (4, 2, 128)
    assert (moe.aux_loss_coeff, moe.capacity_factor) == (0.01, 1.5)
    dense = load_config(MOE, ["model.moe.num_experts=0"])
    assert moe_config(dense) is None
    v3 = moe_config(load_config(MOE, [
        "model.moe.topk_method=noaux_tc", "model.moe.num_groups=2", "model.moe.group_topk=1",
        "model.moe.score_function=sigmoid", "model.moe.routed_scaling_factor=2.5"]))
    assert (v3.group_score, v3.pre_softmax, v3.scaling_factor) == ("top2_sum", True, 2.5)
    width = load_config(MOE, ["model.moe.ffn_hidden_size=null"])
    assert moe_config(width).ffn_hidden_size == width.model.ffn_hidden_size == 256


@pytest.mark.parametrize("override,key,expect", [
    ("training.train_iters=abc", "training.train_iters", "int"),
    ("training.train_iters=2.5", "training.train_iters", "int"),
    ("training.train_iters=true", "training.train_iters", "int"),
    ("parallel.sp=1", "parallel.sp", "bool"),
    ("optimizer.lr=fast", "optimizer.lr", "float"),
    ("training.mode=eager", "training.mode", "graph|pynative"),
    ("model.hf_path=[1, 2]", "model.hf_path", "str"),
    ("optimizer.lr=nan", "optimizer.lr", "finite"),
    ("optimizer.lr=.inf", "optimizer.lr", "finite"),
])
def test_wrong_types_name_key_and_type(override, key, expect):
    msg = _error([override])
    assert msg.startswith(key) and expect in msg


# ---------------------------------------------------------------- hypothesis: generated bad input

_SCHEMA = {key: typ for key, typ, _, _ in schema_rows()}
_IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(sorted(SECTIONS)), name=_IDENT, value=st.integers(0, 9))
def test_generated_unknown_keys_fail_naming_the_key(section, name, value):
    key = f"{section}.{name}"
    if key in _SCHEMA:
        return
    msg = _error([f"{key}={value}"])
    assert msg.startswith(f"unknown key '{key}'")


def _wrong_value(typ: str, draw_int, draw_text):
    if typ in ("int", "int or null"):
        return draw_text  # a word is never an int
    if typ == "bool":
        return str(draw_int)  # an integer is never a bool
    if typ in ("float",):
        return draw_text
    if typ.startswith("one of"):
        return draw_text
    if typ.startswith("list of int"):
        return f"[{draw_int}, {draw_text}]"  # a word inside a list of ints
    if typ.startswith("list of str"):
        return draw_text  # a word is not a list
    return f"[{draw_int}, {draw_int}]"  # str fields: a list


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(sorted(_SCHEMA)), n=st.integers(0, 99),
       word=st.from_regex(r"zz[a-y]{1,8}", fullmatch=True))
def test_generated_wrong_types_fail_naming_the_key(key, n, word):
    value = _wrong_value(_SCHEMA[key], n, word)
    msg = _error([f"{key}={value}"])
    assert msg.startswith(key + ":") or msg.startswith(key + "[1]:"), msg


@settings(max_examples=60, deadline=None)
@given(tp=st.integers(2, 8), heads_mult=st.integers(1, 4), off=st.integers(1, 7), dp=st.integers(1, 3))
def test_generated_heads_not_divisible_by_tp(tp, heads_mult, off, dp):
    heads = tp * heads_mult + (off % tp or 1)  # never a multiple of tp
    overrides = [f"parallel.tp={tp}", f"model.num_heads={heads}", f"model.num_kv_heads={heads}",
                 f"model.hidden_size={heads * 8}", f"training.micro_batch_size=1",
                 f"training.global_batch_size={dp}"]
    msg = _error(overrides, world_size=tp * dp)
    assert "model.num_heads" in msg and "parallel.tp" in msg


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 64), tp=st.integers(1, 8), pp=st.integers(1, 8))
def test_generated_world_not_divisible(world, tp, pp):
    overrides = [f"parallel.tp={tp}", f"parallel.pp={pp}", "model.num_heads=8", "model.num_kv_heads=8",
                 "model.hidden_size=64", "model.num_layers=8", "model.vocab_size=840",
                 "model.ffn_hidden_size=840", "training.micro_batch_size=1"]
    if world % (tp * pp):
        msg = _error(overrides, world_size=world)
        assert "world size" in msg and "parallel.tp" in msg and "parallel.pp" in msg


@settings(max_examples=60, deadline=None)
@given(mbs=st.integers(1, 8), dp=st.integers(1, 4), gbs=st.integers(1, 64))
def test_generated_global_batch_not_divisible(mbs, dp, gbs):
    overrides = [f"training.micro_batch_size={mbs}", f"training.global_batch_size={gbs}"]
    if gbs % (mbs * dp):
        assert "training.global_batch_size" in _error(overrides, world_size=dp)
    else:
        cfg = load_config(None, overrides, world_size=dp)
        assert cfg.training.grad_accum_steps * mbs * dp == gbs


def test_docs_table_matches_code():
    doc = (ROOT / "docs/training_infra.md").read_text()
    assert schema_markdown() in doc, "regenerate the table: python -m training.config --schema"
    assert len(all_keys()) == len(schema_rows()) == len(schema_markdown().splitlines()) - 2


def test_command_line_prints_config_or_one_line_error():
    ok = subprocess.run([sys.executable, "-m", "training.config", "configs/tiny_llama_demo.yaml",
                         "training.train_iters=7"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["training"]["train_iters"] == 7
    bad = subprocess.run([sys.executable, "-m", "training.config", "configs/tiny_llama_demo.yaml",
                          "parallel.tp=2", "--world-size", "3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "parallel.tp" in bad.stderr


@settings(max_examples=40, deadline=None)
@given(pp=st.integers(2, 6), vpp=st.integers(1, 3), layers=st.integers(1, 40))
def test_generated_layers_not_divisible_by_pipeline(pp, vpp, layers):
    overrides = [f"parallel.pp={pp}", f"parallel.vpp={vpp}", f"model.num_layers={layers}",
                 "training.micro_batch_size=1", f"training.global_batch_size={pp}",
                 f"training.eval_iters={pp}"]
    if layers % (pp * vpp):
        msg = _error(overrides, world_size=pp)
        assert "model.num_layers" in msg and "parallel.pp" in msg
    else:
        assert load_config(None, overrides, world_size=pp).parallel.dp == 1


def test_empty_section_in_yaml_accepts_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("parallel:\ntraining:\n  seed: 3\n")
    assert load_config(str(p), ["parallel.tp=2"], world_size=2).parallel.tp == 2


def test_parse_cli_for_entry_points():
    assert parse_cli(["--config", "a.yaml", "parallel.tp=2", "x.y=1"]) == ("a.yaml", ["parallel.tp=2", "x.y=1"])
    assert parse_cli(["--config=b.yaml"]) == ("b.yaml", [])
    assert parse_cli(["training.seed=3"]) == (None, ["training.seed=3"])
    with pytest.raises(ConfigError, match="unknown argument '--tp'"):
        parse_cli(["--tp", "2"])
    with pytest.raises(ConfigError, match="'--config' needs"):
        parse_cli(["--config"])


@pytest.mark.parametrize("split, message", [
    ("[1, 1, 1]", "parallel.layers_per_stage=[1, 1, 1] must have pp*vpp=2"),
    ("[3, 0]", "summing to model.num_layers=2"),
    ("[3, -1]", "non-negative"),
])
def test_layers_per_stage_must_match_the_stages(split, message):
    msg = _error(["parallel.pp=2", "model.num_layers=2", f"parallel.layers_per_stage={split}"],
                 world_size=2)
    assert message in msg, msg


def test_interleaved_needs_micro_batches_in_groups_of_pp():
    msg = _error(["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4",
                  "training.micro_batch_size=1", "training.global_batch_size=3"], world_size=2)
    assert msg.startswith("parallel.vpp=2") and "grad_accum_steps (3)" in msg, msg
