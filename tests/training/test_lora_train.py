"""``lora.enabled`` in training/pretrain.py: one process vs msrun tp=2 with sequence parallelism.

The one-process run (a fresh interpreter) logs the trainable count, keeps only adapters in its
checkpoint (model and Adam moments) and writes the PEFT adapter; the msrun run (2 ranks, tp=2,
sp) gives the same per-step losses, gradient norms and validation loss (1e-5 relative) and the
same adapter, and its checkpoint reads back into a one-process model
(``training.generate.model_from_checkpoint``).
"""
import json

import numpy as np
import pytest

from tests.fresh_process import run_python
from tests.msrun_util import msrun_command, run_msrun, worker_logs
from tests.training.test_pretrain import PRETRAIN, _losses, _tiny, _valid_loss

LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8",
        "lora.target_modules=[q_proj,v_proj,gate_proj,o_proj,down_proj]",
        "training.train_iters=4", "checkpoint.save_interval=0", "logging.sample_tokens=0",
        "optimizer.lr=1e-2"]


def check_single_process(tmp: str) -> None:
    from pathlib import Path

    from training.checkpointing import load_checkpoint
    from training.config import load_config
    from training.pretrain import run

    tmp = Path(tmp)
    run(load_config(None, _tiny(tmp, "one", *LORA)))
    log = (tmp / "one" / "logs" / "rank_0.log").read_text()
    assert "lora: r 4, alpha 8, dropout 0 on 10 modules" in log and "trainable of" in log, log
    ck = load_checkpoint(tmp / "one" / "checkpoints" / "step_000004")
    assert ck.model and all(".lora." in n for n in ck.model), sorted(ck.model)[:5]
    assert ck.optimizer and all(".lora." in n for n in ck.optimizer), sorted(ck.optimizer)[:5]
    config = json.loads((tmp / "one" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    print("LORA_SINGLE_OK")


def check_checkpoint_reads(tmp: str, run: str) -> None:
    """``training.generate.model_from_checkpoint`` of a LoRA run (any tp): the frozen weights as
    training built them plus the checkpoint's adapters, which equal the run's PEFT adapter."""
    from pathlib import Path

    from models.peft import adapter_state
    from models.safetensors_io import read_header
    from training.generate import model_from_checkpoint

    run_dir = Path(tmp) / run
    model, _ = model_from_checkpoint(run_dir / "checkpoints" / "step_000004")
    saved = read_header(run_dir / "adapter" / "adapter_model.safetensors")
    state = adapter_state(model)
    assert sorted(state) == sorted(saved)
    for name, value in state.items():
        np.testing.assert_array_equal(value, saved[name].load(), name)
    print("LORA_CHECKPOINT_OK")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_train")
    res = run_python(f"from tests.training.test_lora_train import check_single_process; "
                     f"check_single_process({str(tmp)!r})", cwd=tmp)
    assert res.returncode == 0 and "LORA_SINGLE_OK" in res.stdout, \
        res.stdout[-3000:] + res.stderr[-3000:]
    return tmp


def test_lora_run_trains_adapters_only(reference):
    losses = _losses(reference / "one")
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1], losses


@pytest.mark.multirank
def test_lora_tp2_sp_matches_one_process(reference):
    from models.safetensors_io import read_header

    tmp = reference
    cmd = msrun_command(PRETRAIN, _tiny(tmp, "tp2", *LORA, "parallel.tp=2", "parallel.sp=true"),
                        workers=2)
    out = run_msrun(cmd, cwd=tmp, timeout=200)
    assert out.returncode == 0, out.stdout[-2000:] + worker_logs(tmp / "logs")[-4000:]
    for key in ("loss", "grad_norm"):
        one, two = _losses(tmp / "one", key), _losses(tmp / "tp2", key)
        assert sorted(two) == sorted(one)
        for step in one:
            assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (key, step, one, two)
    v1, v2 = _valid_loss(tmp / "one"), _valid_loss(tmp / "tp2")
    assert abs(v2 - v1) <= 1e-5 * v1, (v1, v2)
    a = read_header(tmp / "one" / "adapter" / "adapter_model.safetensors")
    b = read_header(tmp / "tp2" / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(b[name].load(), a[name].load(), rtol=0, atol=1e-5, err_msg=name)
    res = run_python(f"from tests.training.test_lora_train import check_checkpoint_reads as c; "
                     f"c({str(tmp)!r}, 'tp2')", cwd=tmp)
    assert res.returncode == 0 and "LORA_CHECKPOINT_OK" in res.stdout, \
        res.stdout[-3000:] + res.stderr[-3000:]
