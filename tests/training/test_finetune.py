"""Fine-tuning numerics on a tiny Llama (training/step.py with packed batches, the segment-id
mask of mcore/fusions/attention.py, training/finetune.py):

- loss masking: the step's loss is the cross-entropy over the assistant tokens only, averaged
  over the kept tokens of the whole global batch (two micro-batches with different counts),
  checked against numpy on the model's own logits;
- packing: two samples packed in one row give the same loss, gradient norm and updated weights
  as the two in rows of their own; sample B's logits do not move when sample A's tokens change
  and equal B's unpacked logits (graph mode, blocked attention with several blocks);
- start from a training checkpoint (``sft.init_checkpoint``) and from a Hugging Face directory
  (``model.hf_path``, with its chat template), and the demo config end to end;
- msrun: dp=2 (two micro-batches per rank, distributed optimizer), tp=2 with sequence
  parallelism, pp=2 (1F1B over four packed micro-batches: every stage gets the positions and
  segment ids) and pp=2 x vpp=2 (interleaved, layers 1, 0, 0, 1 per virtual stage) give the
  one-process loss and gradient norm per step.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tests.fresh_process import assert_check_passes, run_python
from tests.training.runs_worker import launch_runs
from tests.multirank import REPO_ROOT

TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.seq_length=16",
        "model.max_position_embeddings=16", "model.attention_block_size=4",
        "optimizer.weight_decay=0.1", "optimizer.clip_grad=0"]


def _setup(mode: str):
    import mindspore as ms

    import models
    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.model_bridge import hf_config
    from training.step import TrainStep, set_mode

    ms.set_device("CPU")
    set_mode(mode)
    cfg = load_config(None, TINY)

    def step(accum: int):
        ms.set_seed(0)
        model = models.build_from_config(hf_config(cfg.model))
        return model, TrainStep(model, ParallelDims.single(), cfg.optimizer, accum)
    return step


def _row(samples, s=16):
    """Samples ``[(tokens, mask)]`` packed into one row -> (inputs, labels, pos, seg) [1, s]."""
    from training.data.sft import SFTRows

    tokens = np.concatenate([t for t, _ in samples])
    mask = np.concatenate([m for _, m in samples]).astype(np.int8)
    offsets = np.cumsum([0] + [len(t) for t, _ in samples])
    rows = SFTRows(tokens, offsets, mask, [list(range(len(samples)))], s, pad_id=0)
    return rows.batch([0])


def _np_masked_loss(logits, labels) -> tuple[float, int]:
    """Sum of cross-entropies where labels != -100, and their count (float64 numpy)."""
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = labels != -100
    picked = np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    return float(-(picked * keep).sum()), int(keep.sum())


def check_loss_masking() -> None:
    import mindspore as ms

    rng = np.random.default_rng(1)
    make = _setup("pynative")
    model, step = make(2)
    a = (rng.integers(1, 256, 9), np.r_[[0] * 5, [1] * 4])  # 4 assistant labels
    b = (rng.integers(1, 256, 7), np.r_[[0] * 2, [1] * 5])
    c = (rng.integers(1, 256, 12), np.r_[[0] * 3, [1] * 2, [0] * 4, [1] * 3])
    micro = [_row([a, b]), _row([c])]  # different kept-token counts per micro-batch
    total, count = 0.0, 0
    for inputs, labels, pos, seg in micro:
        logits = model(ms.Tensor(inputs), ms.Tensor(pos), ms.Tensor(seg)).asnumpy()
        s, n = _np_masked_loss(logits, labels)
        total, count = total + s, count + n
    assert count == 4 + 5 + 5, count  # assistant tokens after the first of each sample
    loss, _ = step(micro, 1e-3)
    assert abs(loss - total / count) <= 1e-5 * abs(total / count), (loss, total / count)
    means = np.mean([_np_masked_loss(model(ms.Tensor(i), ms.Tensor(p), ms.Tensor(g)).asnumpy(),
                                     lab)[0] for i, lab, p, g in micro])
    assert abs(means - loss) > 1e-3  # (the mean of per-micro-batch means would differ)
    print("MASKING_OK")


def check_packing(mode: str) -> None:
    import mindspore as ms

    rng = np.random.default_rng(2)
    make = _setup(mode)
    a = (rng.integers(1, 256, 7), np.r_[[0] * 3, [1] * 4])
    b = (rng.integers(1, 256, 9), np.r_[[0] * 4, [1] * 5])
    packed = _row([a, b])  # 6 + 8 positions + 2 padding
    rows_a, rows_b = _row([a]), _row([b])
    unpacked = tuple(np.concatenate([x, y]) for x, y in zip(rows_a, rows_b))  # [2, s]
    model_p, step_p = make(1)
    model_u, step_u = make(1)
    # no attention across samples: B's logits ignore A's tokens and equal B alone
    inputs, _, pos, seg = packed
    out = model_p(ms.Tensor(inputs), ms.Tensor(pos), ms.Tensor(seg)).asnumpy()
    changed = inputs.copy()
    changed[0, :6] = (changed[0, :6] + 17) % 256
    out2 = model_p(ms.Tensor(changed), ms.Tensor(pos), ms.Tensor(seg)).asnumpy()
    np.testing.assert_array_equal(out[0, 6:14], out2[0, 6:14])
    assert np.abs(out[0, :6] - out2[0, :6]).max() > 1e-3  # A's own logits did change
    alone = model_p(ms.Tensor(rows_b[0]), ms.Tensor(rows_b[2]), ms.Tensor(rows_b[3])).asnumpy()
    np.testing.assert_allclose(out[0, 6:14], alone[0, :8], rtol=1e-5, atol=1e-5)
    # one training step each: same loss, gradient norm and weights
    for k in range(2):
        lp, gp = step_p([packed], 1e-2)
        lu, gu = step_u([unpacked], 1e-2)
        assert abs(lp - lu) <= 1e-5 * lu and abs(gp - gu) <= 1e-5 * gu, (k, lp, lu, gp, gu)
    wp, wu = step_p.model_state(), step_u.model_state()
    for name in wp:
        # atol: Adam's m / sqrt(v) magnifies rounding where a gradient is ~0 (packed and
        # unpacked batches sum in different orders; 1.3e-5 seen on an AVX2 build). Adam moves
        # a weight by up to lr = 1e-2 per step, so a real difference between the batches is
        # ~100x this bound; the losses and gradient norms above are checked to 1e-5 relative.
        np.testing.assert_allclose(wp[name], wu[name], rtol=1e-5, atol=1e-4, err_msg=name)
    print("PACKING_OK")


def test_loss_counts_only_assistant_tokens_of_the_global_batch():
    assert_check_passes("tests.training.test_finetune", "check_loss_masking", marker="MASKING_OK")


def test_packed_equals_unpacked_and_no_cross_sample_attention_graph_mode():
    assert_check_passes("tests.training.test_finetune", "check_packing", "graph",
                        marker="PACKING_OK")


# --------------------------------------------------------------------- end to end (finetune.py)

RUN = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
       "model.ffn_hidden_size=64", "model.seq_length=64", "model.max_position_embeddings=64",
       "training.train_iters=4", "training.micro_batch_size=1", "training.global_batch_size=4",
       "training.eval_interval=0", "data.valid_fraction=0", "logging.log_interval=1",
       "logging.sample_tokens=8", "checkpoint.save_interval=0"]


def _args(tmp: Path, run: str, *extra) -> list[str]:
    return [str(REPO_ROOT / "configs" / "tiny_sft_demo.yaml"), *RUN,
            f"sft.data={REPO_ROOT / 'configs' / 'data' / 'tiny_chat.jsonl'}",
            f"data.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp / run}", *extra]


def _metrics(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r["kind"] == "train"}


def check_single(tmp: str) -> None:
    """One process: the reference run (its loss falls), a start from its checkpoint at another
    sequence length (lr 0: the weights stay the checkpoint's) and from a HF directory."""
    from training.checkpointing import load_checkpoint
    from training.finetune import main

    tmp = Path(tmp)
    assert main(_args(tmp, "full")) == 0
    ref = tmp / "full" / "checkpoints" / "step_000004"
    assert main(_args(tmp, "init", f"sft.init_checkpoint={ref}", "optimizer.lr=0",
                      "training.mode=pynative", "model.seq_length=32",  # another length: fine
                      "optimizer.min_lr=0", "training.train_iters=1",
                      "optimizer.warmup_iters=0")) == 0
    a = load_checkpoint(ref).model
    b = load_checkpoint(tmp / "init" / "checkpoints" / "step_000001").model
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    log = (tmp / "init" / "logs" / "rank_0.log").read_text()
    assert f"weights from training checkpoint '{ref}'" in log, log[-2000:]
    losses = _metrics(tmp / "full", "loss")
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1], losses
    check_hf_start(tmp)
    print("SINGLE_OK")


def check_hf_start(tmp: Path) -> None:
    """A Hugging Face directory with its own tokenizer and ChatML-style template: its weights
    start the run (lr 0: unchanged after a step) and its template renders the data."""
    import models
    from tests.training.test_sft_data import CHATML
    from training.checkpointing import load_checkpoint
    from training.config import load_config
    from training.data.tokenizer import train_bpe
    from training.finetune import main
    from training.model_bridge import hf_config

    hf = tmp / "hf_dir"
    cfg = load_config(None, [a for a in RUN if a.startswith("model.")] + ["model.vocab_size=512"])
    models.build_from_config(hf_config(cfg.model)).save_pretrained(hf)
    tok = train_bpe([REPO_ROOT / "configs" / "data" / "tiny_chat.jsonl"], 500)
    tok.tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML,
                                                          "eos_token": "<|im_end|>"}))
    assert main(_args(tmp, "hf", f"model.hf_path={hf}", "optimizer.lr=0", "optimizer.min_lr=0",
                      "training.mode=pynative",
                      "training.train_iters=1", "optimizer.warmup_iters=0")) == 0
    saved = load_checkpoint(tmp / "hf" / "checkpoints" / "step_000001").model
    start = {n: p.asnumpy() for n, p in models.from_pretrained(hf).parameters_and_names()}
    assert sorted(saved) == sorted(start)
    for name in saved:
        np.testing.assert_array_equal(saved[name], start[name], err_msg=name)
    log = (tmp / "hf" / "logs" / "rank_0.log").read_text()
    assert f"chat template: {hf / 'tokenizer_config.json'}" in log, log[-2000:]
    assert "<|im_start|>assistant" in log, log[-2000:]  # the sample's prompt


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    res = run_python(f"from tests.training.test_finetune import check_single; "
                     f"check_single({str(tmp)!r})", cwd=tmp)
    assert res.returncode == 0 and "SINGLE_OK" in res.stdout, \
        res.stdout[-3000:] + res.stderr[-3000:]
    return tmp


def test_finetune_runs_and_starts_from_a_checkpoint_or_hf_directory(reference):
    assert (reference / "full" / "tokenizer.json").is_file()
    log = (reference / "full" / "logs" / "rank_0.log").read_text()
    assert "sample (" in log and "<|assistant|>" in log, log[-1500:]


@pytest.mark.multirank
def test_two_ranks_match_one_process(reference):
    """dp=2 (two micro-batches per rank, ZeRO-1 optimizer), tp=2 with sequence parallelism, pp=2
    and pp=2 x vpp=2: the one-process loss and gradient norm per step (one launch of
    ``tests/training/runs_worker.py`` for the four runs; no sample: generating under these
    layouts is checked in test_pretrain*.py)."""
    tmp = reference
    layouts = {"dp2_zero": ["parallel.tp=1", "optimizer.distributed=true"],
               "tp2_sp": ["parallel.tp=2", "parallel.sp=true"],
               "pp2": ["parallel.tp=1", "parallel.pp=2"],
               "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2",
                            "parallel.layers_per_stage=[1,0,0,1]",
                            "training.eval_iters=2"]}  # interleaving needs it divisible by pp
    launch_runs(tmp, "finetune", [_args(tmp, run, *layout, "logging.sample_tokens=0")
                                  for run, layout in layouts.items()], workers=2, timeout=600)
    for run in layouts:
        for key in ("loss", "grad_norm"):
            one, two = _metrics(tmp / "full", key), _metrics(tmp / run, key)
            assert sorted(one) == sorted(two)
            for step in one:
                assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (run, key, step,
                                                                          one[step], two[step])
