"""Context parallelism: every setting the loop cannot run is refused in one line naming the key
(config, ``training/pretrain.py``'s ``check_supported``, ``training/finetune.py``), and the
model refuses what cp cannot do at run time (a KV cache, attention kinds without a cp scheme).
The numerics on real ranks are in ``tests/training/test_pretrain_cp.py``."""
import numpy as np
import pytest

from training.config import ConfigError, load_config

TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=32",
        "model.max_position_embeddings=32"]


def _config_error(overrides, world):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*TINY, *overrides], world_size=world)
    return str(info.value)


def _supported_error(overrides, world):
    from training.pretrain import check_supported

    cfg = load_config(None, [*TINY, *overrides], world_size=world)
    with pytest.raises(ConfigError) as info:
        check_supported(cfg, tokenizer=False)
    return str(info.value)


@pytest.mark.parametrize("overrides, world, expect", [
    (["parallel.cp=2", "model.seq_length=30", "model.max_position_embeddings=30"], 2,
     "model.seq_length=30 is not divisible by 2*parallel.cp=4"),
    (["parallel.cp_comm=mesh"], 1, "parallel.cp_comm='mesh' must be one of a2a, ring"),
    (["parallel.cp=4", "model.num_heads=6", "model.num_kv_heads=6", "model.hidden_size=48"], 4,
     "model.num_heads=6 is not divisible by parallel.tp*parallel.cp=4"),
    (["parallel.cp=2", "model.num_heads=6", "model.num_kv_heads=3", "model.hidden_size=48"], 2,
     "model.num_kv_heads=3: 3 per tp rank neither divide nor are divisible by parallel.cp=2"),
    (["parallel.cp=2", "parallel.tp=4", "parallel.sp=true", "parallel.cp_comm=ring",
      "model.num_kv_heads=4", "model.seq_length=12", "model.max_position_embeddings=12"], 8,
     "model.seq_length=12 is not divisible by parallel.cp*parallel.tp"),
])
def test_config_errors_name_the_key(overrides, world, expect):
    assert expect in _config_error(overrides, world)


def test_ring_takes_heads_a2a_cannot_split():
    cfg = load_config(None, [*TINY, "parallel.cp=2", "parallel.cp_comm=ring", "model.num_heads=6",
                             "model.num_kv_heads=3", "model.hidden_size=48"], world_size=2)
    assert (cfg.parallel.cp, cfg.parallel.dp, cfg.parallel.cp_comm) == (2, 1, "ring")
    cfg = load_config(None, [*TINY, "parallel.cp=2", "parallel.tp=2"], world_size=8)
    assert cfg.parallel.dp == 2


@pytest.mark.parametrize("overrides, world, expect", [
    (["parallel.cp=2", "parallel.pp=2"], 4, "parallel.cp=2: context parallelism with pipeline "
                                            "parallelism (parallel.pp=2) is not implemented"),
    (["parallel.cp=2", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=16"], 2,
     "model.moe.num_experts=4"),
    (["parallel.cp=2", "model.mtp.num_layers=1"], 2, "model.mtp.num_layers=1"),
    (["parallel.cp=2", "lora.enabled=true"], 2, "lora.enabled"),
    (["parallel.cp=2", "model.family=deepseek_v3", "model.mla.kv_lora_rank=16",
      "model.mla.qk_rope_head_dim=4", "model.mla.qk_nope_head_dim=4", "model.mla.v_head_dim=8"], 2,
     "multi-latent attention (model.family=deepseek_v3)"),
])
def test_unsupported_combinations_name_the_key(overrides, world, expect):
    assert expect in _supported_error(overrides, world)


def test_finetune_refuses_cp(tmp_path):
    from training.finetune import check_finetune

    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": []}\n')
    cfg = load_config(None, [*TINY, "parallel.cp=2", f"sft.data={data}"], world_size=2)
    with pytest.raises(ConfigError, match="parallel.cp=2: fine-tuning trains on packed samples"):
        check_finetune(cfg)


def _cp_model(**overrides):
    """A one-process GPTModel whose layers believe they sit in a 2-rank cp group (building
    needs no communication; anything that reaches a collective would)."""
    from mcore.parallel_state import ModelGroups, ProcessGroup
    from mcore.transformer.config import ParallelConfig, TransformerConfig
    from mcore.transformer.layer_specs import gpt_layer_spec
    from models.gpt import GPTModel

    sizes = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
             "ffn_hidden_size": 64, **overrides}
    cfg = TransformerConfig(parallel=ParallelConfig(context_parallel_comm="a2a"), **sizes)
    groups = ModelGroups(cp=ProcessGroup("cp", (0, 1), 0, "cp_group_never_created"))
    return GPTModel(cfg, gpt_layer_spec(cfg), 64, groups=groups)


def test_model_refuses_kv_cache_and_key_mask_under_cp():
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)  # the eager forward raises (another test may compile)
    model = _cp_model()
    ids = ms.Tensor(np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="no KV cache"):
        model(ids, cache=model.new_cache())
    with pytest.raises(ValueError, match="no key_mask"):
        model(ids, key_mask=ms.Tensor(np.ones((1, 4), np.int32)))


def test_model_refuses_alibi_and_indivisible_heads_under_cp():
    with pytest.raises(ValueError, match="alibi"):
        _cp_model(position_embedding="alibi")
    with pytest.raises(ValueError, match="cp_comm=ring"):
        _cp_model(num_attention_heads=3, num_query_groups=3, hidden_size=24)


def test_sampling_twin_drops_cp():
    from mcore.parallel_state import ParallelDims
    from mcore.rank_layout import RankLayout
    from training.pretrain import model_groups

    dims = ParallelDims.from_layout(RankLayout(world=2, cp=2), 1)
    cfg = load_config(None, [*TINY, "parallel.cp=2"], world_size=2)
    assert model_groups(cfg, dims).cp.size == 2
    cfg.parallel.cp = 1
    single = model_groups(cfg, dims).cp
    assert single.size == 1 and single.global_rank == 1
