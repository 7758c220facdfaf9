"""Fine-tuning mixture-of-experts and multi-token-prediction models, LoRA on pipeline stages,
and serving a MoE + MLA model with tp=2.

- one process (a fresh one): a tiny MoE model (4 experts, top-2, router loss, expert bias on)
  fine-tunes on packed chat rows, and LoRA (q_proj, v_proj) on the same model; LoRA targets
  that match expert weights are refused with one ``config error``;
- multi-token prediction on packed rows (two depths): ``GPTModel.loss_terms`` with the packed
  denominator equals an independent composition of each sample run ALONE through the
  pre-training path (no packing, no segment ids): the language-model loss, each depth's loss
  and every gradient (1e-5). A depth target that crossed into the next sample would add terms
  the composition does not have;
- one msrun launch (2 ranks, ``tests/training/sft_moe_worker.py``): MoE SFT with ep=2 (dp=2)
  gives the one-process loss, gradient norm, router loss and largest expert load per step
  (1e-5); MoE LoRA with pp=2 (1F1B over four packed micro-batches, router losses on both
  stages) gives the one-process loss and gradient norm and writes ONE PEFT directory equal to
  the one-process adapter; the DeepSeek-V3 fixture (MoE + multi-latent attention) served by the
  engine with tp=2 in lockstep answers two batched greedy requests with the one-process
  ``models.generate`` tokens.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fresh_process import assert_check_passes, run_python
from tests.msrun_util import msrun_command, run_msrun, worker_logs
from tests.multirank import REPO_ROOT

RUN = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
       "model.ffn_hidden_size=64", "model.seq_length=64", "model.max_position_embeddings=64",
       "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32",
       "model.moe.aux_loss_coeff=0.01", "model.moe.expert_bias=true",
       "model.moe.bias_update_rate=0.01", "training.train_iters=3",
       "training.micro_batch_size=1", "training.global_batch_size=4", "training.eval_interval=0",
       "data.valid_fraction=0", "logging.log_interval=1", "logging.sample_tokens=0",
       "checkpoint.save_interval=0"]
LORA = ["lora.enabled=true", "lora.target_modules=[q_proj,v_proj]", "optimizer.lr=1e-2"]
PROMPTS = ["def f(", "Hello,"]
SERVE_TOKENS = 10


def finetune_args(tmp: Path, run: str, *extra) -> list[str]:
    return [str(REPO_ROOT / "configs" / "tiny_sft_demo.yaml"), *RUN,
            f"sft.data={REPO_ROOT / 'configs' / 'data' / 'tiny_chat.jsonl'}",
            f"data.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp / run}", *extra]


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


def serving_reference(tmp: Path) -> None:
    """The DeepSeek-V3 fixture with a one-character-per-id tokenizer, and its greedy answers
    (one prompt at a time, one process) in ``tmp/served_one.json``."""
    import mindspore as ms

    import models
    from tests.training.serve_fixture import write_ascii_tokenizer
    from training.generate import load

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)

    d = tmp / "ds3"
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "hf" / "deepseek_v3", d)
    write_ascii_tokenizer(d / "tokenizer.json")
    model, tok = load(str(d))
    out = {}
    for p in PROMPTS:
        new = models.generate(model, [tok.encode(p)], SERVE_TOKENS, compiled=False)[0]
        out[p] = tok.decode(new)
    (tmp / "served_one.json").write_text(json.dumps(out))


def check_single(tmp: str) -> None:
    from training.finetune import main

    tmp = Path(tmp)
    serving_reference(tmp)  # first: the training runs leave the process in graph mode
    assert main(finetune_args(tmp, "one")) == 0
    assert main(finetune_args(tmp, "lora_one", *LORA)) == 0
    print("SINGLE_OK")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune_moe")
    res = run_python(f"from tests.training.test_finetune_moe import check_single; "
                     f"check_single({str(tmp)!r})", cwd=tmp)
    assert res.returncode == 0 and "SINGLE_OK" in res.stdout, \
        res.stdout[-3000:] + res.stderr[-3000:]
    return tmp


def test_moe_model_fine_tunes_with_router_losses_and_lora(reference):
    full, lora = _metrics(reference / "one"), _metrics(reference / "lora_one")
    assert sorted(full) == sorted(lora) == [1, 2, 3]
    for rec in full.values():
        assert rec["moe_aux_loss"] > 0 and rec["moe_dropped_share"] == 0, rec
    log = (reference / "lora_one" / "logs" / "rank_0.log").read_text()
    assert "lora: r 8, alpha 16" in log, log[-1500:]
    assert (reference / "lora_one" / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_targets_matching_expert_weights_are_refused(tmp_path):
    from training.config import ConfigError
    from training.finetune import parse_args

    args = finetune_args(tmp_path, "x", "lora.enabled=true", "lora.target_modules=[up_proj]")
    with pytest.raises(ConfigError, match=r"lora.target_modules=\['up_proj'\] matches MoE "
                                          r"expert weights \(model.layers.\d.mlp.experts.0.up_proj"):
        parse_args(["--config", *args])


# ------------------------------------------------------ multi-token prediction on packed rows

MTP = ["model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2",
       "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=64",
       "model.seq_length=32", "model.max_position_embeddings=32", "model.mtp.num_layers=2",
       "model.mtp.loss_factor=0.3"]


def check_mtp_packed() -> None:
    """See the module docstring (PyNative, one process)."""
    import mindspore as ms

    from tests.training.test_finetune import _row
    from training.config import load_config
    from training.model_bridge import build_gpt

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(0)
    model = build_gpt(load_config(None, MTP))
    rng = np.random.default_rng(3)
    samples = [(rng.integers(1, 128, 11), np.r_[[0] * 4, [1] * 3, [0] * 2, [1] * 2]),
               (rng.integers(1, 128, 9), np.r_[[0] * 3, [1] * 6]),
               (rng.integers(1, 128, 8), np.r_[[0] * 2, [1] * 6])]
    inputs, labels, pos, seg = (ms.Tensor(x) for x in _row(samples, 32))  # 10 + 8 + 7 + pad
    alone = [tuple(ms.Tensor(x[:, :len(t) - 1]) for x in _row([(t, m)], 32)[:2])
             for t, m in samples]
    n_kept = float((labels.asnumpy() != -100).sum())
    depths, factor = 2, 0.3

    def packed():
        _, lm, _, _, mtp = model.loss_terms(inputs, labels, pos, seg, ms.Tensor(n_kept))
        return lm + factor * mtp.mean(), lm, mtp

    def composed():  # each sample alone, pre-training path: per-sample means back to sums
        lm, mtp = 0.0, [0.0] * depths
        for x, y in alone:
            _, lm_s, _, _, mtp_s = model.loss_terms(x, y)
            lab = y.asnumpy()[0]
            lm = lm + lm_s * lab.size  # mean over the sample's positions -> sum
            for k in range(1, depths + 1):
                valid = float(max((lab[k:] != -100).sum(), 1))
                mtp[k - 1] = mtp[k - 1] + mtp_s[k - 1] * valid  # mean over targets -> sum
        lm, mtp = lm / n_kept, ms.ops.stack(mtp) / n_kept
        return lm + factor * mtp.mean(), lm, mtp

    params = model.trainable_params()
    (_, lm_p, mtp_p), g_p = ms.value_and_grad(packed, None, params, has_aux=True)()
    (_, lm_c, mtp_c), g_c = ms.value_and_grad(composed, None, params, has_aux=True)()
    np.testing.assert_allclose(lm_p.asnumpy(), lm_c.asnumpy(), rtol=1e-5)
    np.testing.assert_allclose(mtp_p.asnumpy(), mtp_c.asnumpy(), rtol=1e-5)
    assert mtp_p.asnumpy().min() > 0
    for p, a, b in zip(params, g_p, g_c):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-7, err_msg=p.name)
    assert any(np.abs(g.asnumpy()).max() > 0 for p, g in zip(params, g_p) if "mtp." in p.name)
    print("MTP_OK")


def test_mtp_on_packed_rows_equals_samples_alone():
    assert_check_passes("tests.training.test_finetune_moe", "check_mtp_packed", marker="MTP_OK")


# ------------------------------------------------------------------------- the msrun launch

@pytest.mark.multirank
def test_ep2_moe_sft_pp2_lora_and_tp2_moe_serving_match_one_process(reference):
    from models.safetensors_io import read_checkpoint

    tmp = reference
    cmd = msrun_command(str(REPO_ROOT / "tests" / "training" / "sft_moe_worker.py"), [tmp],
                        workers=2)
    out = run_msrun(cmd, cwd=tmp, timeout=300)
    logs = worker_logs(tmp / "logs")
    assert out.returncode == 0, out.stdout[-2000:] + logs[-4000:]
    keys = {"one": ("loss", "grad_norm", "moe_aux_loss", "moe_tokens_max"),
            "lora_one": ("loss", "grad_norm")}
    for ref, run in (("one", "ep2"), ("lora_one", "lora_pp2")):
        one, two = _metrics(tmp / ref), _metrics(tmp / run)
        assert sorted(one) == sorted(two) == [1, 2, 3]
        for step in one:
            for key in keys[ref]:
                a, b = one[step][key], two[step][key]
                assert abs(a - b) <= 1e-5 * abs(a), (run, key, step, a, b)
    single, staged = tmp / "lora_one" / "adapter", tmp / "lora_pp2" / "adapter"
    assert json.loads((single / "adapter_config.json").read_text()) == \
        json.loads((staged / "adapter_config.json").read_text())
    a, b = read_checkpoint(single), read_checkpoint(staged)
    assert sorted(a) == sorted(b) and len(a) == 8  # q, v x A, B x 2 layers
    for name in a:
        np.testing.assert_allclose(b[name].load(), a[name].load(), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    served = json.loads((tmp / "served_tp2.json").read_text())
    assert served == json.loads((tmp / "served_one.json").read_text()), served
