"""Logger: progress line, metrics.jsonl, per-rank log files, TensorBoard events, FLOPs and MFU."""
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event

from training.config import load_config
from training.logger import (RunLogger, count_parameters, estimate_mfu, format_duration, format_progress,
                             model_flops_per_token)


def read_events(path):
    """Parse a TensorBoard event file (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(Event.FromString(data[pos + 12:pos + 12 + n]))
        pos += 12 + n + 4
    return events


def test_progress_line_format():
    line = format_progress(20, 300, 4.81234, 2e-3, 0.9121, 10342.4, 0.0191, 72)
    assert line == "step  20/300 | loss 4.8123 | lr 2.00e-03 | grad 0.912 | 10,342 tok/s | MFU 1.9% | ETA 1m12s"
    assert "grad" not in format_progress(1, 9, 1.0, 1.0, None, 1.0, None, 5)
    first = format_progress(1, 300, 7.65641, 2e-4, 1.5171, 188.0, 0.005, 1625, compile_s=10.94)
    assert first == "step   1/300 | loss 7.6564 | lr 2.00e-04 | grad 1.517 | 10.9 s incl. compilation"
    assert format_duration(3725) == "1h02m" and format_duration(9) == "9s"


def test_run_logger_writes_everything(tmp_path):
    out = io.StringIO()
    log = RunLogger(tmp_path, rank=0, world_size=2, total_steps=6, flops_per_token=1e6, peak_flops=1e9,
                    log_interval=2, stream=out)
    for step in range(1, 7):
        log.step(step, loss=5.0 / step, lr=1e-3 * step, grad_norm=0.5, tokens=1000, step_time=0.5,
                 loss_scale=1.0)
    log.eval(6, 2.0)
    log.info("done")
    log.close()
    lines = out.getvalue().splitlines()
    assert [l.split("|")[0].strip() for l in lines[:4]] == ["step 1/6", "step 2/6", "step 4/6", "step 6/6"]
    assert lines[0].endswith("| 0.5 s incl. compilation")  # the first step: no tok/s, no ETA
    assert "MFU 100.0%" in lines[1]  # 1e6 flop/token * 2000 tok/s / (1e9 * 2 ranks)
    assert lines[-2].startswith("validation at step 6: loss 2.0000") and lines[-1] == "done"
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "loss_scale"} <= set(train[0])
    assert train[0]["tokens_per_s"] == 2000.0
    assert records[-1]["kind"] == "valid" and records[-1]["valid_loss"] == 2.0
    assert "done" in (tmp_path / "logs" / "rank_0.log").read_text()
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    scalars = {}
    for e in read_events(event_file):
        for v in e.summary.value:
            scalars.setdefault(v.tag, []).append((e.step, v.simple_value))
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "valid/loss"):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 7))
    assert scalars["train/lr"][2][1] == pytest.approx(3e-3)


@pytest.mark.parametrize("first_step", [1, 51])
def test_eta_leaves_out_the_compiling_first_step(tmp_path, first_step):
    out = io.StringIO()
    with RunLogger(tmp_path, total_steps=first_step + 9, stream=out) as log:
        for step, seconds in zip(range(first_step, first_step + 3), (100.0, 2.0, 4.0)):
            log.step(step, loss=1.0, lr=1e-3, grad_norm=None, tokens=8, step_time=seconds)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("| 100.0 s incl. compilation")
    assert lines[1].endswith("| 4 tok/s | ETA 16s")  # 2 s x 8 steps left
    assert lines[2].endswith("| 2 tok/s | ETA 21s")  # (2 + 4) / 2 s x 7 steps left
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["tokens_per_s"] == 0.08 and record["step_time"] == 100.0


def test_moe_metrics_in_line_jsonl_and_tensorboard(tmp_path):
    from training.logger import moe_metrics

    counts = np.array([[3, 5, 0, 8], [4, 4, 4, 4]])  # [layers, experts]
    moe = moe_metrics(0.0125, counts, dropped=2, routed=32)
    assert moe["moe_tokens_min"] == 0 and moe["moe_tokens_max"] == 8
    assert moe["moe_tokens_std"] == pytest.approx(float(np.std(counts)))
    assert moe["moe_dropped_share"] == 2 / 32 and moe["moe_aux_loss"] == 0.0125
    assert moe_metrics(0.0, [1, 1], 0, 0)["moe_dropped_share"] == 0.0
    out = io.StringIO()
    with RunLogger(tmp_path, total_steps=2, stream=out) as log:
        log.step(1, 1.0, 1e-3, 0.5, 10, 0.1, **moe)
    line = out.getvalue().splitlines()[0]
    assert "| grad 0.500 | aux 0.0125 | experts 0/8/2.1 (min/max/std) | dropped 6.2% |" in line
    (record,) = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {k: record[k] for k in moe} == moe
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    tags = {v.tag for e in read_events(event_file) for v in e.summary.value}
    assert {f"train/{k}" for k in moe} <= tags


def test_mtp_metrics_in_line_jsonl_and_tensorboard(tmp_path):
    from training.logger import moe_metrics, mtp_metrics

    assert mtp_metrics([2.5]) == {"mtp_loss": 2.5}
    mtp = mtp_metrics(np.array([3.0, 4.0], np.float32))
    assert mtp == {"mtp_loss": 3.5, "mtp_loss_1": 3.0, "mtp_loss_2": 4.0}
    out = io.StringIO()
    with RunLogger(tmp_path, total_steps=2, stream=out) as log:
        log.step(1, 1.0, 1e-3, 0.5, 10, 0.1, **mtp)
        log.step(2, 1.0, 1e-3, 0.5, 10, 0.1, **mtp, **moe_metrics(0.01, [1, 3], 0, 4))
    first, second = out.getvalue().splitlines()[:2]
    assert "| grad 0.500 | mtp 3.5000 | " in first and "aux" not in first
    assert "| grad 0.500 | mtp 3.5000 | aux 0.0100 | experts 1/3/1.0" in second
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({k: r[k] for k in mtp} == mtp for r in records)
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    tags = {v.tag for e in read_events(event_file) for v in e.summary.value}
    assert {"train/mtp_loss", "train/mtp_loss_1", "train/mtp_loss_2"} <= tags


def test_non_zero_rank_writes_only_its_log(tmp_path):
    out = io.StringIO()
    with RunLogger(tmp_path, rank=1, world_size=2, total_steps=2, stream=out) as log:
        log.step(1, 1.0, 1e-3, float("nan"), 10, 0.1)
    assert out.getvalue() == "" and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "tensorboard").exists()
    assert "step 1/2" in (tmp_path / "logs" / "rank_1.log").read_text()


def test_nan_is_written_as_null(tmp_path):
    with RunLogger(tmp_path, total_steps=1, tensorboard=False, stream=io.StringIO()) as log:
        log.step(1, float("nan"), 1e-3, None, 10, 0.0)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["loss"] is None and rec["tokens_per_s"] is None


def test_flops_and_parameter_count():
    m = load_config(None, ["model.vocab_size=100", "model.hidden_size=8", "model.num_layers=2",
                           "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_hidden_size=16",
                           "model.seq_length=4", "model.max_position_embeddings=4"]).model
    per_layer = 2 * 64 + 2 * 8 * 4 + 3 * 8 * 16 + 2 * 8
    assert count_parameters(m) == 2 * per_layer + 100 * 8 + 8 + 100 * 8
    matmul = 2 * (2 * 64 + 2 * 8 * 4 + 3 * 8 * 16) + 100 * 8
    assert model_flops_per_token(m) == 6 * matmul + 12 * 2 * 8 * 4
    assert estimate_mfu(1e9, 100, 1e12) == pytest.approx(0.1)
    bench = load_config(str(Path(__file__).resolve().parents[2] / "configs/tiny_llama_bench.yaml")).model
    assert count_parameters(bench) == 4 * (2 * 512**2 + 2 * 512 * 128 + 3 * 512 * 1408 + 1024) + 2 * 32000 * 512 + 512


def test_flops_count_the_active_experts_of_moe_layers():
    """3 layers, the first dense: 2 MoE layers of router + top-2 of 4 experts + a shared expert."""
    base = ["model.vocab_size=100", "model.hidden_size=8", "model.num_layers=3",
            "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_hidden_size=16",
            "model.seq_length=4", "model.max_position_embeddings=4"]
    moe = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=6",
           "model.moe.shared_ffn_hidden_size=5", "model.moe.first_k_dense=1"]
    attention = 2 * 8 * 8 + 2 * 8 * 4  # q, o: 8 x 8; k, v: 8 x (1 kv head * 4)
    dense_mlp = 3 * 8 * 16
    moe_mlp = 8 * 4 + 2 * (3 * 8 * 6) + 3 * 8 * 5  # router, 2 active experts, shared
    matmul = 3 * attention + dense_mlp + 2 * moe_mlp + 100 * 8
    m = load_config(None, base + moe).model
    assert model_flops_per_token(m) == 6 * matmul + 12 * 3 * 8 * 4
    # the expert width defaults to model.ffn_hidden_size; no shared expert; every layer MoE
    m = load_config(None, base + ["model.moe.num_experts=4", "model.moe.top_k=1"]).model
    matmul = 3 * (attention + 8 * 4 + 1 * 3 * 8 * 16) + 100 * 8
    assert model_flops_per_token(m) == 6 * matmul + 12 * 3 * 8 * 4
    # head_dim set apart from hidden / heads (Qwen3): projections and scores use heads * head_dim
    m = load_config(None, base + ["model.head_dim=6"]).model
    attention = 2 * 8 * 2 * 6 + 2 * 8 * 1 * 6
    matmul = 3 * (attention + dense_mlp) + 100 * 8
    assert model_flops_per_token(m) == 6 * matmul + 12 * 3 * 2 * 6 * 4


def tensorboard_scalars(logdir):
    """What TensorBoard shows: event files read in name order, and (its rule for files of
    version ``brain.Event:2``) a ``SessionLog.START`` event at step ``s`` drops every event seen
    so far with step >= ``s``. Returns ``{tag: [(step, value), ...]}``."""
    events = []
    for path in sorted(logdir.iterdir()):
        for e in read_events(path):
            if e.HasField("session_log") and e.session_log.status == e.session_log.START:
                events = [old for old in events if old.step < e.step]
            events.append(e)
    scalars = {}
    for e in events:
        for v in e.summary.value:
            scalars.setdefault(v.tag, []).append((e.step, v.simple_value))
    return scalars


def test_resumed_run_records_each_step_once(tmp_path):
    """Run 1 records steps 1-6 (and a validation at 6) but its checkpoint is from step 4; run 2
    resumes there and records 5-8: metrics.jsonl and TensorBoard hold each step once."""
    with RunLogger(tmp_path, total_steps=8, stream=io.StringIO()) as log:
        for step in range(1, 7):
            log.step(step, loss=10.0 + step, lr=1e-3, grad_norm=1.0, tokens=10, step_time=0.1)
        log.eval(4, 3.0)
        log.eval(6, 2.0)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 7, "lo')  # a crash in the middle of a line
    out = io.StringIO()
    with RunLogger(tmp_path, total_steps=8, stream=out) as log:
        log.resumed(4, "ckpts/step_000004")
        for step in range(5, 9):
            log.step(step, loss=20.0 + step, lr=1e-3, grad_norm=1.0, tokens=10, step_time=0.1)
    assert "resumed after step 4 from 'ckpts/step_000004'" in out.getvalue()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        *[("train", s) for s in range(1, 5)], ("valid", 4), ("resumed", 4),
        *[("train", s) for s in range(5, 9)]]
    assert records[5]["checkpoint"] == "ckpts/step_000004"
    assert [r["loss"] for r in records if r["kind"] == "train"] == [11, 12, 13, 14, 25, 26, 27, 28]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 11), (2, 12), (3, 13), (4, 14), (5, 25), (6, 26), (7, 27),
                                     (8, 28)]
    assert scalars["valid/loss"] == [(4, 3.0)]
