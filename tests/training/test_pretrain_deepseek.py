"""configs/tiny_deepseek_v3_demo.yaml (shrunk): the YAML builds a DeepSeek-V3-shaped model (MLA,
first layer dense, sigmoid group routing with correction bias, a shared expert, one MoE MTP
depth),
training/pretrain.py trains it on the bundled corpus in graph mode with the MTP loss logged, and
``save_pretrained`` of the YAML model reads back through ``models.from_pretrained``. On real
ranks (one msrun launch of 4: tp=2 x ep=2 with etp=2, dp=2) every step has the one-process
loss, gradient norm and MTP loss (1e-5 relative) and the same tokens per expert, and the
validation loss is the one-process one (1e-5)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.msrun_util import msrun_command, run_msrun, worker_logs
from tests.multirank import REPO_ROOT
from tests.training.test_pretrain import _valid_losses
from training.config import ConfigError, load_config

CONFIG = str(REPO_ROOT / "configs" / "tiny_deepseek_v3_demo.yaml")
STEPS = 6
TINY = ["model.vocab_size=512", "model.seq_length=32", "model.max_position_embeddings=32",
        "data.corpus_max_bytes=200000", "training.micro_batch_size=2",
        "training.global_batch_size=4", f"training.train_iters={STEPS}",
        "training.eval_interval=0", "optimizer.warmup_iters=2", "optimizer.lr=3e-3",
        "logging.log_interval=1", "logging.tensorboard=false", "logging.sample_tokens=0"]


def test_yaml_builds_the_deepseek_v3_shape(tmp_path):
    import mindspore as ms

    import models
    from mcore.moe.layer import MoELayer
    from mcore.transformer.mla import MultiLatentAttention
    from training.model_bridge import build_gpt

    ms.set_device("CPU")
    cfg = load_config(CONFIG, TINY)
    model = build_gpt(cfg)
    layers = model.decoder.layers
    assert all(isinstance(layer.self_attention, MultiLatentAttention) for layer in layers)
    assert not isinstance(layers[0].mlp, MoELayer)
    for layer in layers[1:]:
        assert isinstance(layer.mlp, MoELayer) and layer.mlp.has_shared
        assert layer.mlp.router.use_bias and layer.mlp.moe.group_score == "top2_sum"
    assert model.mtp is not None and model.config.mtp.loss_factor == 0.3
    depth = model.mtp.layers[0].layer  # MoE like a checkpoint's layer num_hidden_layers
    assert isinstance(depth.mlp, MoELayer) and depth.mlp.router.use_bias
    assert model.moe_layers == (1, 2, 3)  # its routing rows follow the decoder's
    model.save_pretrained(tmp_path)  # the MTP depth as layer 3, skipped by from_pretrained
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    again = models.from_pretrained(tmp_path)
    ids = ms.Tensor(np.arange(12, dtype=np.int32).reshape(2, 6))
    np.testing.assert_array_equal(again(ids).asnumpy(), model(ids).asnumpy())


@pytest.mark.parametrize("overrides, message", [
    (["model.mla.kv_lora_rank=null"], r"^model\.mla\.kv_lora_rank=None"),
    (["model.mla.qk_rope_head_dim=3"], r"^model\.mla\.qk_rope_head_dim=3"),
    (["model.family=llama", "model.moe.num_experts=0", "model.mtp.num_layers=0"],
     r"^model\.mla\.kv_lora_rank=16: .*deepseek_v3"),
])
def test_bad_mla_keys_are_named(overrides, message):
    from training.model_bridge import transformer_config

    with pytest.raises(ConfigError, match=message):
        transformer_config(load_config(CONFIG, TINY + overrides))


PRETRAIN = str(REPO_ROOT / "training" / "pretrain.py")


def _args(tmp, run: str, *extra) -> list[str]:
    return ["--config", CONFIG, *TINY, f"data.cache_dir={tmp / 'cache'}",
            f"logging.output_dir={tmp / run}", "checkpoint.save_interval=0", *extra]


def _records(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain_deepseek")
    res = subprocess.run([sys.executable, PRETRAIN, *_args(tmp, "full")], capture_output=True,
                         text=True, timeout=600, cwd=tmp)
    return tmp, res


def test_pretrain_trains_with_mtp(reference):
    tmp, res = reference
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    train = [r for _, r in sorted(_records(tmp / "full").items())]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["mtp_loss"]) and r["mtp_loss"] > 0 for r in train)
    assert all(r["moe_dropped_share"] == 0.0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 0.05


@pytest.mark.multirank
def test_tp2_ep2_matches_one_process(reference):
    tmp, res = reference
    assert res.returncode == 0, res.stderr[-3000:]
    log_dir = tmp / "logs_tp2_ep2"
    # dp=2: two validation micro-batches per rank are the one process's four (the same samples)
    cmd = msrun_command(PRETRAIN, _args(tmp, "tp2_ep2", "parallel.tp=2", "parallel.ep=2",
                                        "parallel.etp=2", "training.eval_iters=2"),
                        workers=4, log_dir=str(log_dir))
    out = run_msrun(cmd, cwd=tmp, timeout=600)
    logs = worker_logs(log_dir)
    assert out.returncode == 0, out.stdout[-2000:] + logs[-4000:]
    assert "tp 2 x pp 1 x ep 2 x dp 2" in logs, logs[-2000:]
    one, many = _records(tmp / "full"), _records(tmp / "tp2_ep2")
    assert sorted(many) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "grad_norm", "mtp_loss"):
            a, b = one[step][key], many[step][key]
            assert abs(b - a) <= 1e-5 * abs(a), (step, key, a, b)
        for key in ("moe_tokens_min", "moe_tokens_max", "moe_tokens_std"):
            assert many[step][key] == pytest.approx(one[step][key], rel=1e-6), (step, key)
    one, many = _valid_losses(tmp / "full"), _valid_losses(tmp / "tp2_ep2")
    assert len(one) == len(many) == 1 and abs(many[0] - one[0]) <= 1e-5 * one[0], (one, many)
