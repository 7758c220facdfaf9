"""training/pretrain.py with a tiny mixture-of-experts model (configs/tiny_moe_demo.yaml, shrunk),
dropless, all-gather dispatcher, aux-loss-free expert bias on, graph mode, 6 steps.

- the expert bias (one fresh process, TrainStep on random tokens): after each applied step it
  equals a numpy replay of ``bias += rate * sign(mean(load) - load)`` from the step's returned
  counts (exact); a skipped step (NaN gradient) leaves it; the compiled step routes with it;
- with the expert bias off (the demo's default) nothing of the routers is saved, and
  ``training.generate.model_from_checkpoint`` reads the checkpoint (no training run);

- one process: the loss falls; 6 steps == 3 steps + stop + resume (same losses, experts and
  Adam moments restored); metrics.jsonl carries the router loss, tokens per expert and the
  dropped share (0 when dropless; tokens per expert add up to every assignment);
- real ranks (msrun; one launch per rank count runs them all, ``tests/training/runs_worker.py``):
  ep=2 (2 ranks, dp=2, edp=1), ep=2 x dp=2 (4 ranks, edp=2) and ep=2 x tp=2 with etp=2 (4 ranks,
  dp=2, edp=1) give the one-process loss and gradient norm per step (1e-5 relative), the same
  tokens per expert and (dp=2) the validation loss; the checkpoint (every rank writing its ep /
  etp expert shards) reads back as whole expert tensors equal to the one-process checkpoint's,
  and the one-process expert biases (exactly); ``training.generate.model_from_checkpoint`` reads
  it into the one-process model.
- ep=2 x pp=2 (4 ranks, 1F1B, router losses on both pipeline stages): the same per-step loss,
  gradient norm, router loss and tokens per expert; each stage's layers are written by that
  stage's ranks, and the experts and biases read back as in the one-process checkpoint; the sample
  is generated through the stages.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fresh_process import run_python
from tests.multirank import REPO_ROOT
from tests.training.runs_worker import launch_by_rank_count
from tests.training.test_pretrain import _valid_losses

PRETRAIN = str(REPO_ROOT / "training" / "pretrain.py")
CONFIG = str(REPO_ROOT / "configs" / "tiny_moe_demo.yaml")
STEPS = 6
TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=64", "model.moe.ffn_hidden_size=32", "model.seq_length=32",
        "model.max_position_embeddings=32", "data.corpus_max_bytes=200000",
        "training.micro_batch_size=2", "training.global_batch_size=8",
        f"training.train_iters={STEPS}", "training.eval_interval=0", "training.eval_iters=2",
        "optimizer.lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.warmup_iters=2",
        "logging.log_interval=1", "logging.tensorboard=false", "logging.sample_tokens=0",
        "model.moe.expert_bias=true", "model.moe.bias_update_rate=0.01"]
EXPERTS = [f"decoder.layers.{i}.mlp.experts.{w}" for i in (1, 2) for w in ("fc1", "fc2")]
BIASES = [f"decoder.layers.{i}.mlp.router.expert_bias" for i in (1, 2)]


def _args(tmp: Path, run: str, *extra) -> list[str]:
    return ["--config", CONFIG, *TINY, f"data.cache_dir={tmp / 'cache'}",
            f"logging.output_dir={tmp / run}", *extra]


def _records(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


def check_single_process(tmp: str) -> None:
    """One process (a fresh one: the execution mode is process-global)."""
    from training.checkpointing import load_checkpoint
    from training.config import load_config, parse_cli
    from training.pretrain import run

    tmp = Path(tmp)

    def cfg(run_name, *extra):
        path, overrides = parse_cli(_args(tmp, run_name, *extra))
        return load_config(path, overrides)

    run(cfg("full", "checkpoint.save_interval=0"))
    full = _records(tmp / "full")
    assert sorted(full) == list(range(1, STEPS + 1))
    assert full[STEPS]["loss"] < full[1]["loss"] - 0.1, full  # it learns
    routed = 8 * 32 * 2 * 2  # tokens per step x top_k x MoE layers
    for r in full.values():
        assert r["moe_dropped_share"] == 0.0 and r["moe_aux_loss"] > 0
        assert 0 < r["moe_tokens_min"] <= routed / 8 <= r["moe_tokens_max"]  # mean of 8 entries
    args = ("checkpoint.save_interval=3", "checkpoint.load=auto")
    run(cfg("resumed", *args), stop_after=3)
    run(cfg("resumed", *args))
    again = _records(tmp / "resumed")
    assert {s: r["loss"] for s, r in again.items()} == {s: r["loss"] for s, r in full.items()}
    a = load_checkpoint(tmp / "full" / "checkpoints" / f"step_{STEPS:06d}")
    b = load_checkpoint(tmp / "resumed" / "checkpoints" / f"step_{STEPS:06d}")
    assert set(EXPERTS + BIASES) <= set(a.model) and sorted(a.model) == sorted(b.model)
    assert not any(n.startswith("adam_") and "expert_bias" in n for n in a.optimizer)
    assert all(np.abs(a.model[n]).max() > 0 for n in BIASES)  # it moved
    for name in a.model:
        np.testing.assert_array_equal(a.model[name], b.model[name], err_msg=name)
    for name in a.optimizer:
        np.testing.assert_array_equal(a.optimizer[name], b.optimizer[name], err_msg=name)
    print("SINGLE_OK")


def check_bias_replay(tmp: str) -> None:
    """TrainStep of the shrunk config on random tokens (a fresh process: graph mode)."""
    import mindspore as ms
    from mindspore import ops

    from mcore.parallel_state import ParallelDims
    from training.config import load_config, parse_cli
    from training.pretrain import build_model, build_step

    path, overrides = parse_cli(_args(Path(tmp), "unused"))
    cfg = load_config(path, overrides)
    dims = ParallelDims.single()
    model = build_model(cfg, dims)
    step = build_step(cfg, model, dims, grad_accum_steps=2)
    names = [n for n, _ in step.buffers]
    assert names == BIASES, names
    assert not any("expert_bias" in n for n, _ in step.named)  # neither optimised nor in the norm
    rate = np.float32(0.01)
    expect = np.zeros((2, 4), np.float32)  # [MoE layers, experts]
    rng = np.random.default_rng(0)
    for i in range(5):
        micro = [(rng.integers(0, 512, (2, 32)).astype(np.int32),
                  rng.integers(0, 512, (2, 32)).astype(np.int32)) for _ in range(2)]
        skip = i == 2
        if skip:  # a NaN gradient: the update is skipped
            ops.assign(step.acc[0], ops.fill(ms.float32, step.acc[0].shape, float("nan")))
        before = step.adam_steps
        loss, norm = step(micro, 1e-2)
        counts = step.last_moe_counts  # [L, E], summed over both micro-batches
        assert counts.shape == (2, 4) and counts.sum() == 2 * 2 * 32 * 2 * 2, counts
        assert (step.adam_steps == before) == skip and np.isfinite(norm) != skip, (i, norm)
        if not skip:
            load = counts.astype(np.float32)
            expect = expect + rate * np.sign(load.mean(1, keepdims=True) - load)
        got = np.stack([p.asnumpy() for _, p in step.buffers])
        np.testing.assert_array_equal(got, expect, err_msg=f"step {i}")
    assert np.abs(expect).max() > 0
    # The compiled step reads the bias as updated in place: a huge bias on expert 0 of the first
    # MoE layer sends every token there.
    router = step.bias_routers[0][1]
    ops.assign(router.expert_bias, ms.Tensor([100.0, 0, 0, 0], ms.float32))
    _, _, counts, _ = step.forward_backward(ms.Tensor(micro[0][0]), ms.Tensor(micro[0][1]),
                                         ms.Tensor(0.0, ms.float32))
    assert counts.asnumpy()[0, 0] == 2 * 32, counts
    print("BIAS_OK")


def test_expert_bias_update_equals_numpy_and_skips(tmp_path):
    res = run_python(f"from tests.training.test_pretrain_moe import check_bias_replay; "
                     f"check_bias_replay({str(tmp_path)!r})", cwd=tmp_path, timeout=600)
    assert res.returncode == 0 and "BIAS_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def test_stage_statistics_take_their_rows_of_the_whole_model():
    """``MoEStats.finish`` with a pipeline rank's ``StageLayers`` (pp of one rank here: the
    all-reduce is the identity): its layers' counts land in their rows of the whole model, the
    other rows stay 0, and a rank without MoE layers still returns the whole model's shape."""
    from mcore.parallel_state import ProcessGroup
    from training.moe_step import MoEStats, StageLayers

    one = ProcessGroup.single()
    stats = MoEStats()
    for micro in range(2):
        stats.add(np.full((1, 3), 0.5), np.array([[1.0, 2, 3, 4 + micro]]), routed=20)
    metrics, counts = stats.finish(one, StageLayers(one, local=(3,), model=(1, 3, 4),
                                                    num_experts=4))
    np.testing.assert_array_equal(counts, [[0, 0, 0, 0], [2, 4, 6, 9], [0, 0, 0, 0]])
    assert metrics["moe_aux_loss"] == 1.5 and metrics["moe_tokens_max"] == 9
    assert metrics["moe_dropped_share"] == pytest.approx(19 / 40)
    _, counts = MoEStats().finish(one, StageLayers(one, local=(), model=(1, 3), num_experts=4))
    assert counts.shape == (2, 4) and not counts.any()
    with pytest.raises(ValueError, match="no micro-batch"):
        MoEStats().finish(one)


def test_generate_reads_a_checkpoint_saved_without_expert_biases(tmp_path):
    """With ``model.moe.expert_bias`` off (the demo's default) training does not save the
    routers' unused ``expert_bias``; ``generate.py`` reads the checkpoint all the same (it
    used to fail: 'has no tensor ... expert_bias'), and a missing trained weight still fails."""
    import mindspore as ms

    from mcore.checkpoint import CheckpointError
    from mcore.parallel_state import ParallelDims
    from training.checkpointing import save_train_state
    from training.config import load_config
    from training.generate import model_from_checkpoint
    from training.model_bridge import build_gpt
    from training.pretrain import build_step

    ms.set_device("CPU")
    overrides = [o for o in TINY if "expert_bias" not in o and "bias_update" not in o]
    # pynative: build_step sets the execution mode of this whole (shared) pytest process
    cfg = load_config(CONFIG, [*overrides, "training.mode=pynative"])
    model = build_gpt(cfg)
    step_fn = build_step(cfg, model, ParallelDims.single(), 1)
    assert not step_fn.buffers  # nothing of the routers is saved
    ck = save_train_state(tmp_path, 1, step_fn, ParallelDims.single(), {"config": cfg.to_dict()})
    loaded, _ = model_from_checkpoint(ck)
    want = dict(model.parameters_and_names())
    for name, param in loaded.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), want[name].asnumpy(), err_msg=name)
    meta = json.loads((ck / "meta.json").read_text())
    del meta["tensors"]["decoder.layers.1.mlp.experts.fc1"]
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="experts.fc1"):
        model_from_checkpoint(ck)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain_moe")
    res = run_python(f"from tests.training.test_pretrain_moe import check_single_process; "
                     f"check_single_process({str(tmp)!r})", cwd=tmp, timeout=600)
    return tmp, res


def test_moe_loss_falls_metrics_and_resume_is_exact(reference):
    tmp, res = reference
    assert res.returncode == 0 and "SINGLE_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| aux " in res.stdout and "(min/max/std) | dropped 0.0%" in res.stdout


def test_moe_config_errors_before_work(tmp_path):
    from training.config import ConfigError, load_config, parse_cli
    from training.pretrain import check_supported

    path, overrides = parse_cli(_args(tmp_path, "out", "parallel.pp=3", "parallel.tp=2"))
    with pytest.raises(ConfigError, match=r"^parallel.tp=2, parallel.pp=3: training/pretrain.py "
                                          r"trains MoE"):
        check_supported(load_config(path, overrides, world_size=6))
    res = subprocess.run([sys.executable, PRETRAIN,
                          *_args(tmp_path, "out", "model.moe.dispatcher=alltoall")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("config error: model.moe.dispatcher=alltoall runs eagerly only")
    assert not (tmp_path / "out").exists()


def _assert_steps_match(tmp, run_dir):
    """Every step of ``run_dir`` has the one-process loss, gradient norm and router loss
    (1e-5 relative) and the same tokens-per-expert statistics."""
    one, many = _records(tmp / "full"), _records(run_dir)
    assert sorted(many) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "grad_norm", "moe_aux_loss"):
            a, b = one[step][key], many[step][key]
            assert abs(b - a) <= 1e-5 * abs(a), (step, key, a, b)
        for key in ("moe_tokens_min", "moe_tokens_max", "moe_tokens_std", "moe_dropped_share"):
            assert many[step][key] == pytest.approx(one[step][key], rel=1e-6), (step, key)


# name: (workers, extra keys); order tp-cp-ep-dp-pp. With dp=2, one validation micro-batch per
# rank covers the one process's two (the same samples): the validation loss is compared; dp=4
# cannot split them and validates nothing (training.eval_iters=0).
LAYOUTS = {
    "ep2": (2, ["parallel.ep=2", "training.eval_iters=1"]),  # dp=2, edp=1
    "ep2_dp2": (4, ["parallel.ep=2", "training.eval_iters=0"]),  # dp=4, edp=2
    "ep2_tp2_etp2": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.etp=2",  # dp=2, edp=1
                         "training.eval_iters=1"]),
}
# ep=2 x pp=2 (1F1B; dp=2, edp=1), layers 0-1 | 2: the first stage's MoE layer adds its router
# losses in that stage's backward (interleaved schedules run the same runner steps in another
# order: tests/models/test_gpt_pipeline_moe.py checks those steps' gradients); it samples.
PIPELINED = {"ep2_pp2": (4, ["parallel.ep=2", "parallel.pp=2", "parallel.layers_per_stage=[2,1]",
                             "logging.sample_tokens=2"], [{0, 1}, {2}])}


@pytest.fixture(scope="module")
def launched(reference):
    """Every multi-rank run, one msrun launch per rank count (``tests/training/runs_worker.py``)."""
    tmp, res = reference
    assert res.returncode == 0, res.stderr[-3000:]
    launch_by_rank_count(tmp, "pretrain", {
        run: (workers, _args(tmp, run, *extra, "checkpoint.save_interval=0"))
        for run, (workers, extra, *_) in {**LAYOUTS, **PIPELINED}.items()})
    return tmp


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_matches_one_process(launched, layout):
    from training.checkpointing import load_checkpoint
    from training.generate import model_from_checkpoint

    tmp = launched
    workers, extra = LAYOUTS[layout]
    run_dir = tmp / layout
    _assert_steps_match(tmp, run_dir)
    one, many = _valid_losses(tmp / "full"), _valid_losses(run_dir)
    if "training.eval_iters=1" in extra:
        assert len(many) == 1 and abs(many[0] - one[0]) <= 1e-5 * one[0], (one, many)
    else:
        assert many == [], many
    # Weights after 6 AdamW steps: an element whose gradient is ~0 gets an update of up to lr
    # from rounding-level gradient differences (m / sqrt(v)), hence the absolute tolerance.
    ref = load_checkpoint(tmp / "full" / "checkpoints" / f"step_{STEPS:06d}")
    ck = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    saved = load_checkpoint(ck).model  # the ranks' expert shards (ep, etp) as whole tensors
    for name in EXPERTS:
        np.testing.assert_allclose(saved[name], ref.model[name], rtol=1e-4, atol=2e-5, err_msg=name)
    for name in BIASES:  # same counts every step, so the same signs
        np.testing.assert_array_equal(saved[name], ref.model[name], err_msg=name)
    # generate.py reads the checkpoint (saved over tp, ep, etp) into the one-process model
    merged, _ = model_from_checkpoint(ck)
    whole = dict(model_from_checkpoint(ref.path)[0].parameters_and_names())
    for name, param in merged.parameters_and_names():
        np.testing.assert_allclose(param.asnumpy(), whole[name].asnumpy(), rtol=1e-4, atol=2e-5,
                                   err_msg=name)



@pytest.mark.multirank
@pytest.mark.parametrize("run", list(PIPELINED))
def test_pipeline_parallel_moe_matches_one_process(launched, run):
    """The one-process loss, gradient norm, router loss and tokens per expert per step; each
    rank's checkpoint holds its stage's layers with its ep share of their experts and the
    one-process biases; the run generates its sample through the stages."""
    from training.checkpointing import load_checkpoint

    tmp = launched
    workers, _, stage_layers = PIPELINED[run]
    run_dir = tmp / run
    log = (run_dir / "logs" / "rank_0.log").read_text()
    assert "x pp 2" in log and "sample (" in log, log[-3000:]
    _assert_steps_match(tmp, run_dir)
    ref = load_checkpoint(tmp / "full" / "checkpoints" / f"step_{STEPS:06d}")
    ck = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    meta = json.loads((ck / "meta.json").read_text())
    for r, layers in enumerate(stage_layers):  # stage r's layers come from that stage's ranks
        files = {sh["file"] for n, t in meta["tensors"].items() if n.startswith("decoder.layers.")
                 and int(n.split(".")[2]) in layers for sh in t["shards"]}
        stage_ranks = range(r * (workers // 2), (r + 1) * (workers // 2))
        assert files <= {f"{k}_rank{q}.safetensors" for q in stage_ranks for k in ("model", "optim")}
    saved = load_checkpoint(ck).model
    for name in EXPERTS + BIASES:
        if name in BIASES:  # same counts every step, so the same signs
            np.testing.assert_array_equal(saved[name], ref.model[name], err_msg=name)
        else:
            np.testing.assert_allclose(saved[name], ref.model[name], rtol=1e-4, atol=2e-5,
                                       err_msg=name)
