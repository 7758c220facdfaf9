"""The legacy layer's contracts, in one process: registry and lazy import, the mcore blocks the
older families need (ALiBi slopes, learned positions, multi-query attention, config checks),
the weight-table pieces they use (Conv1D-transposed and row-range), and the config mapping of
the Llama-family aliases that have no fixture of their own (their numerics are those of a
fixture family: see the README's legacy table)."""
from __future__ import annotations

import math
from types import ModuleType

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mcore.transformer.config import TransformerConfig  # noqa: E402
from mcore.transformer.positions import alibi_slopes, alibi_slopes_for_rank  # noqa: E402
from models.hf import FAMILIES, build_from_config, family_of, register_family  # noqa: E402
from models.weights import Piece, to_hf, to_local  # noqa: E402
from tests.fresh_process import run_python  # noqa: E402
from tests.legacy.remote_ref import InMemoryTensor  # noqa: E402


def test_models_does_not_import_legacy_and_finds_it_by_model_type():
    res = run_python(
        "import sys, models; assert 'legacy' not in sys.modules, 'models imported legacy'; "
        "from models.hf import family_of; fam = family_of({'model_type': 'bloom'}); "
        "assert 'legacy' in sys.modules and fam.__name__ == 'legacy.bloom'; print('OK')")
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"model_type='gpt_neo' is not supported.*bloom.*gpt2"):
        family_of({"model_type": "gpt_neo"})


def test_register_family_checks_the_module():
    bad = ModuleType("fake_family")
    bad.MODEL_TYPES = ("fake",)
    with pytest.raises(ValueError, match=r"missing \['TIE_DEFAULT', 'config_from_hf'"):
        register_family(bad)
    clash = ModuleType("clash")
    for attr in ("TIE_DEFAULT", "config_from_hf", "layer_spec", "weight_table"):
        setattr(clash, attr, None)
    clash.MODEL_TYPES = ("llama",)
    with pytest.raises(ValueError, match="model_type 'llama' is already models.llama"):
        register_family(clash)
    assert FAMILIES["llama"].__name__ == "models.llama"


def test_alibi_slopes():
    # powers of two: 2 ** (-8 i / n); 6 heads: the 4-head slopes, then odd terms of the 8-head ones
    np.testing.assert_allclose(alibi_slopes(4), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])
    np.testing.assert_allclose(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8,
                                                 2 ** -1, 2 ** -3], rtol=1e-6)
    both = np.concatenate([alibi_slopes_for_rank(8, 2, r) for r in range(2)])
    np.testing.assert_array_equal(both, alibi_slopes(8))
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible"):
        alibi_slopes_for_rank(6, 4, 0)


def test_alibi_attention_matches_a_numpy_reference():
    from mcore.fusions.attention import CoreAttention

    rng = np.random.default_rng(0)
    b, n, s, d = 1, 4, 5, 8
    q, k, v = (rng.standard_normal((b, n, s, d)).astype(np.float32) for _ in range(3))
    slopes = alibi_slopes(n)
    out = CoreAttention(n, 1 / math.sqrt(d), alibi_slopes=slopes, num_kv_heads=n)(
        ms.Tensor(q), ms.Tensor(k), ms.Tensor(v)).asnumpy()
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)  # [b, n, s, s]
    scores = scores + slopes[None, :, None, None] * np.arange(s)[None, None, None, :]
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)


def test_position_embedding_config_errors():
    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16)
    with pytest.raises(ValueError, match="position_embedding='sinusoid'"):
        TransformerConfig(**base, position_embedding="sinusoid")
    with pytest.raises(ValueError, match="max_position_embeddings=None"):
        TransformerConfig(**base, position_embedding="learned")


def test_learned_positions_and_embedding_norm_refuse_sequence_parallelism():
    from mcore.transformer.config import ParallelConfig
    from mcore.transformer.layer_specs import gpt_layer_spec
    from models.gpt import GPTModel

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                            ffn_hidden_size=16, position_embedding="learned",
                            max_position_embeddings=16,
                            parallel=ParallelConfig(sequence_parallel=True))
    with pytest.raises(NotImplementedError, match="learned position embeddings"):
        GPTModel(cfg, gpt_layer_spec(cfg), 32)


def test_multi_query_attention_needs_one_kv_head():
    from legacy import gpt_bigcode

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                            ffn_hidden_size=16, num_query_groups=2)
    spec = gpt_bigcode.layer_spec(TransformerConfig(num_layers=1, hidden_size=8,
                                                    num_attention_heads=2, ffn_hidden_size=16,
                                                    num_query_groups=1))
    attention = spec.submodules.self_attention
    with pytest.raises(ValueError, match="num_query_groups=2: MultiQueryAttention"):
        attention.module(cfg, attention.submodules)


def test_gpt2_rejects_what_it_does_not_implement():
    hf = {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 32}
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=true"):
        build_from_config({**hf, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="activation_function='swish'"):
        build_from_config({**hf, "activation_function": "swish"})


@pytest.mark.parametrize("tp", [1, 2])
def test_transposed_and_row_range_pieces_round_trip(tp):
    rng = np.random.default_rng(1)
    conv = rng.standard_normal((4, 6)).astype(np.float32)  # Conv1D [in, out] = [q | k | v]
    fused = rng.standard_normal((8, 4)).astype(np.float32)  # Linear [q (4); kv (4)]
    table = {"qkv": tuple(Piece("conv", 2, count=3, index=j, transposed=True) for j in range(3)),
             "q": (Piece("fused", 4, offset=0),), "kv": (Piece("fused", 4, offset=4),)}
    hf = {"conv": InMemoryTensor(conv), "fused": InMemoryTensor(fused)}
    dims = {"qkv": 0, "q": 0, "kv": None}
    shapes = {"qkv": (6 // tp, 4), "q": (4 // tp, 4), "kv": (4, 4)}
    ranks = [to_local(table, hf, shapes, dims, tp, r) for r in range(tp)]
    np.testing.assert_array_equal(ranks[0]["kv"], fused[4:])
    np.testing.assert_array_equal(np.concatenate([r["q"] for r in ranks]), fused[:4])
    full = {"qkv": np.concatenate([r["qkv"] for r in ranks]),
            "q": np.concatenate([r["q"] for r in ranks]), "kv": ranks[0]["kv"]}
    if tp == 1:
        np.testing.assert_array_equal(full["qkv"], conv.T)
    back = to_hf(table, full, dims, tp)
    np.testing.assert_array_equal(back["conv"], conv)
    np.testing.assert_array_equal(back["fused"], fused)


ALIASES = {  # alias: (model_type, distinguishing config.json keys, expected TransformerConfig)
    "Llama 3 (8B)": ("llama", {"num_key_value_heads": 2, "rope_theta": 500000.0},
                     {"rotary.base": 500000.0, "rotary.scaling": "none", "num_query_groups": 2}),
    "CodeLlama": ("llama", {"rope_theta": 1000000.0, "vocab_size": 32016},
                  {"rotary.base": 1000000.0, "num_query_groups": 4}),
    "Yi": ("llama", {"num_key_value_heads": 1, "rope_theta": 5000000.0},
           {"rotary.base": 5000000.0, "num_query_groups": 1}),
    "Qwen1.5": ("qwen2", {"num_key_value_heads": 4, "tie_word_embeddings": False},
                {"attention.qkv_bias": True, "num_query_groups": 4}),
}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_llama_family_alias_config_maps(alias):
    kind, keys, want = ALIASES[alias]
    hf = {"model_type": kind, "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 4, **keys}
    model = build_from_config(hf)
    for field, value in want.items():
        obj = model.config
        for part in field.split("."):
            obj = getattr(obj, part)
        assert obj == value, (alias, field, obj)
    assert model.tie_embeddings is bool(keys.get("tie_word_embeddings", False))


def test_base_model_checkpoint_without_prefix_and_with_mask_buffers_loads(tmp_path):
    """GPT-2 as the Hub stores it: names without ``transformer.`` and the old causal-mask
    buffers ``h.N.attn.bias``; the model equals the one from the fixture."""
    import shutil

    import models
    from models.safetensors_io import read_checkpoint, write_checkpoint

    fixture = __import__("pathlib").Path(__file__).resolve().parent.parent / "fixtures/hf/gpt2"
    tensors = {n.removeprefix("transformer."): t.load()
               for n, t in read_checkpoint(fixture).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    write_checkpoint(tmp_path, tensors)
    shutil.copy(fixture / "config.json", tmp_path / "config.json")
    ref = np.load(fixture / "reference.npz")
    ids = ms.Tensor(ref["input_ids"])
    got = models.from_pretrained(tmp_path)(ids).asnumpy()
    np.testing.assert_array_equal(got, models.from_pretrained(fixture)(ids).asnumpy())
