"""LoRA on one process (models/peft.py, mcore/tensor_parallel/lora.py): the adapter's math
against numpy, merge, the PEFT layout round trip, the frozen base in the training step, errors.
The tp=2 equivalence runs on real ranks in tests/models/test_lora_tp.py and
tests/training/test_lora_train.py."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "llama"
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _ids():
    import mindspore as ms

    return ms.Tensor(np.load(FIXTURE / "reference.npz")["input_ids"])


def _randomise_adapters(model, seed: int = 0) -> None:
    """Non-zero B (and fresh A) so the adapters change the output."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    for name, p in model.parameters_and_names():
        if ".lora." in name:
            p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))


def test_adapter_output_matches_numpy_on_fused_and_row_layers():
    """y = x W^T + alpha/r B A x on the chosen fused parts only (q and v of q/k/v), and on a
    row-parallel layer; B starts at zero (the adapted layer equals the base at init)."""
    import mindspore as ms

    from mcore.parallel_state import ProcessGroup
    from mcore.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from mcore.tensor_parallel.lora import attach_lora

    tp = ProcessGroup.single("tp")
    x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float32)
    col = ColumnParallelLinear(8, 12, tp, bias=True, partitions=(4, 4, 4), name="qkv_test")
    row = RowParallelLinear(8, 6, tp, bias=False, name="row_test")
    base_col, base_row = col(ms.Tensor(x)).asnumpy(), row(ms.Tensor(x)).asnumpy()
    ad_col = attach_lora(col, (0, 2), r=2, alpha=6.0)
    ad_row = attach_lora(row, (0,), r=3, alpha=3.0)
    np.testing.assert_array_equal(col(ms.Tensor(x)).asnumpy(), base_col)
    assert not col.weight.requires_grad and not col.bias.requires_grad
    rng = np.random.default_rng(2)
    for part in [*ad_col.parts, *ad_row.parts]:
        part.lora_B.set_data(ms.Tensor(rng.normal(size=part.lora_B.shape).astype(np.float32)))
    want = base_col.copy()
    for part, (lo, hi) in zip(ad_col.parts, [(0, 4), (8, 12)]):
        a, b = part.lora_A.asnumpy(), part.lora_B.asnumpy()
        want[..., lo:hi] += 3.0 * (x @ a.T) @ b.T  # alpha / r = 3
    np.testing.assert_allclose(col(ms.Tensor(x)).asnumpy(), want, rtol=1e-5, atol=1e-5)
    a, b = ad_row.parts[0].lora_A.asnumpy(), ad_row.parts[0].lora_B.asnumpy()
    np.testing.assert_allclose(row(ms.Tensor(x)).asnumpy(), base_row + (x @ a.T) @ b.T,
                               rtol=1e-5, atol=1e-5)


def test_merged_weights_give_the_adapter_logits(tmp_path):
    import models
    from models.peft import apply_lora, merge_lora

    model = models.from_pretrained(FIXTURE)
    ids = _ids()
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS)
    _randomise_adapters(model)
    adapted = model(ids).asnumpy()
    assert np.abs(adapted - models.from_pretrained(FIXTURE)(ids).asnumpy()).max() > 1e-2
    merge_lora(model)
    assert not any(".lora." in n for n, _ in model.parameters_and_names())
    assert all(p.requires_grad for p in model.get_parameters())
    np.testing.assert_allclose(model(ids).asnumpy(), adapted, rtol=0, atol=2e-5)
    model.save_pretrained(tmp_path / "merged")
    again = models.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(again(ids).asnumpy(), adapted, rtol=0, atol=2e-5)


def test_peft_layout_round_trip(tmp_path):
    import models
    from models.peft import apply_lora, load_adapter, save_adapter
    from models.safetensors_io import read_header

    model = models.from_pretrained(FIXTURE)
    ids = _ids()
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS, dropout=0.05)
    _randomise_adapters(model, seed=3)
    model.set_train(False)  # dropout off
    want = model(ids).asnumpy()
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(FIXTURE))
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["lora_dropout"] == 0.05 and config["base_model_name_or_path"] == str(FIXTURE)
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    tensors = read_header(tmp_path / "ad" / "adapter_model.safetensors")
    # PEFT's names and shapes: lora_A [r, in], lora_B [out, r] (q: 4 heads x 16, v: 2 x 16)
    prefix = "base_model.model.model.layers"
    assert tensors[f"{prefix}.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors[f"{prefix}.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert len(tensors) == 2 * 2 * len(TARGETS)  # 2 layers x (A, B) x modules
    fresh = models.from_pretrained(FIXTURE)
    load_adapter(fresh, tmp_path / "ad")
    fresh.set_train(False)
    np.testing.assert_array_equal(fresh(ids).asnumpy(), want)


def test_frozen_base_gets_no_update_and_no_optimizer_state():
    """Plain AdamW and the ZeRO-1 update: only the adapters are trained, have moments and
    gradient buffers; every frozen weight is bit-identical after two steps."""
    import mindspore as ms

    import models
    from mcore.parallel_state import ParallelDims
    from models.peft import apply_lora
    from training.config import load_config
    from training.step import TrainStep, set_mode

    set_mode("pynative")
    ids = np.load(FIXTURE / "reference.npz")["input_ids"].astype(np.int32)
    batch = [(ids, np.roll(ids, -1, 1))]
    for distributed in (False, True):
        model = models.from_pretrained(FIXTURE)
        apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "down_proj"])
        before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
        cfg = load_config(None, [f"optimizer.distributed={str(distributed).lower()}"])
        step = TrainStep(model, ParallelDims.single(), cfg.optimizer, 1)
        names = [n for n, _ in step.named]
        assert names and all(".lora." in n for n in names), names
        assert all(".lora." in n for n in step.state_dict()), sorted(step.state_dict())[:4]
        assert len(step.acc) == len(names)
        for _ in range(2):
            loss, norm = step(batch, 1e-2)
            assert np.isfinite(loss) and norm > 0
        for n, p in model.parameters_and_names():
            if ".lora." in n:
                if "lora_B" in n:
                    assert np.abs(p.asnumpy() - before[n]).max() > 0, n
            else:
                np.testing.assert_array_equal(p.asnumpy(), before[n], err_msg=n)
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("kwargs, key", [
    ({"target_modules": ["q_proj", "qq_proj"]}, "target_modules: 'qq_proj' matches no module"),
    ({"target_modules": r".*\.nothing"}, "target_modules="),
    ({"target_modules": []}, "target_modules: empty"),
    ({"r": 0}, "r=0"),
    ({"r": -2}, "r=-2"),
    ({"dropout": 1.0}, "dropout=1.0"),
])
def test_bad_arguments_raise_one_error_naming_the_argument(kwargs, key):
    import models
    from models.peft import apply_lora

    model = models.from_pretrained(FIXTURE)
    args = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ValueError, match="^" + re.escape(key)) as exc:
        apply_lora(model, **args)
    assert len(str(exc.value).splitlines()) == 1
    assert not any(".lora." in n for n, _ in model.parameters_and_names())


@pytest.mark.parametrize("override, key", [
    ("lora.r=0", "lora.r=0"),
    ("lora.target_modules=[q_proj,nope_proj]", "lora.target_modules: 'nope_proj'"),
    ("lora.dropout=1.5", "lora.dropout=1.5"),
    ("lora.load=/nonexistent/adapter", "lora.load"),
])
def test_bad_lora_config_is_one_config_error(override, key, capsys):
    from training.pretrain import config_or_exit

    argv = ["model.num_layers=2", "lora.enabled=true", override]
    with pytest.raises(SystemExit) as exc:
        config_or_exit(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("config error: ") and key in err[0], err


def test_a_pipeline_stage_without_an_adapted_module_is_refused():
    """pp=2 with adapters on the head only: the first stage would train nothing."""
    from models.gpt_pipeline import stage_specs
    from training.config import ConfigError, load_config
    from training.lora import apply_config, check_lora
    from training.model_bridge import build_gpt

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
                             "model.num_kv_heads=2", "model.ffn_hidden_size=64",
                             "model.tie_word_embeddings=false", "lora.enabled=true",
                             "lora.target_modules=[lm_head]", "parallel.pp=2"], world_size=2)
    check_lora(cfg)  # the whole model has the module
    first, last = stage_specs(2, 2)
    apply_config(cfg, build_gpt(cfg, stage=last), stage=True)
    with pytest.raises(ConfigError, match=r"^lora.target_modules=\['lm_head'\]: the pipeline "
                                          r"stage of layers \[0\] holds none of them"):
        apply_config(cfg, build_gpt(cfg, stage=first), stage=True)


PEFT_FIXTURE = FIXTURE.parent.parent / "peft" / "llama_lora"  # made by tests/make_peft_fixture.py


def test_adapter_made_by_peft_gives_peft_logits_and_saves_back_unchanged(tmp_path):
    """An adapter written by PEFT itself (every projection, non-zero B) on the fixture: our
    model with it gives PEFT's logits, and saving it again gives PEFT's tensors."""
    import models
    from models.peft import load_adapter, save_adapter
    from models.safetensors_io import read_header

    ref = np.load(PEFT_FIXTURE / "reference.npz")
    model = models.from_pretrained(FIXTURE)
    info = load_adapter(model, PEFT_FIXTURE)
    assert len(info.modules) == 2 * 7 and info.scale == 2.0
    np.testing.assert_allclose(model(_ids()).asnumpy(), ref["logits"], rtol=0, atol=1e-4)
    base = models.from_pretrained(FIXTURE)(_ids()).asnumpy()
    assert np.abs(base - ref["logits"]).max() > 1e-2  # the adapter matters
    save_adapter(model, tmp_path / "again")
    theirs = read_header(PEFT_FIXTURE / "adapter_model.safetensors")
    ours = read_header(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name].load(), theirs[name].load(), name)


def test_unsupported_peft_variant_is_one_load_error(tmp_path):
    import shutil

    import models
    from models.errors import LoadError
    from models.peft import load_adapter

    shutil.copytree(PEFT_FIXTURE, tmp_path / "dora")
    path = tmp_path / "dora" / "adapter_config.json"
    path.write_text(path.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(LoadError, match="use_dora=True is not supported"):
        load_adapter(models.from_pretrained(FIXTURE), tmp_path / "dora")
