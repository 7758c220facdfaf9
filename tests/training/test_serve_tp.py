"""training/serve.py under msrun on 2 ranks (tp = 2, one launch): the served source is a
training checkpoint holding the tiny Llama fixture's weights (so each rank reads its tp shards
through ``mcore/checkpoint``); rank 0 serves HTTP on a port the test chose; 4 concurrent greedy completions (two of them streamed) equal one-process
``models.generate`` of each prompt alone; /health shows the requests shared decode steps;
rank 1 replayed exactly rank 0's prefills and decode steps; SIGTERM to rank 0 (its pid from
the ready line) stops both ranks and msrun exits 0.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from tests.msrun_util import msrun_command, msrun_env, worker_logs
from tests.training.serve_fixture import SERVE, free_port, get_json, make_model_dir

PROMPTS = ["def f(", "Hello,", "def add(a, ", "The quick b"]
N = 20


def _complete(url: str, prompt: str, stream: bool) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": N, "temperature": 0,
            "stream": stream}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        if not stream:
            return json.loads(r.read())["choices"][0]["text"]
        chunks = [json.loads(line[6:]) for line in map(bytes.decode, r)
                  if line.startswith("data: {")]
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def _checkpoint(model_dir: Path) -> Path:
    """A one-process training checkpoint (step 1) of the HF fixture's weights and config."""
    import models
    from mcore.checkpoint import save_checkpoint
    from training.config import load_config

    cfg = load_config(None, [f"model.hf_path={model_dir}"])
    model = models.from_pretrained(model_dir)
    state = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    meta = {"config": cfg.to_dict(), "tokenizer": str(model_dir / "tokenizer.json")}
    return save_checkpoint(model_dir.parent / "checkpoints", 1, state, {}, meta)


def _reference(model_dir) -> list[str]:
    """Greedy answers of the HF directory, one prompt at a time, in this process."""
    import models
    from training.generate import load

    model, tok = load(str(model_dir))
    out = []
    for prompt in PROMPTS:
        new = models.generate(model, [tok.encode(prompt)], N, stop_tokens=[tok.eod_id],
                              compiled=True)[0]
        out.append(tok.decode(new[:-1] if new[-1] == tok.eod_id else new))
    return out


def _wait_ready(proc, log, deadline: float) -> int:
    """Rank 0's pid, once its ready line is in ``log``."""
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = re.search(r"serving 'tiny' on .*tp 2, pid (\d+)\)", text)
        if found:
            return int(found.group(1))
        time.sleep(0.3)
    raise AssertionError(f"not ready (msrun {proc.poll()}):\n{worker_logs(log.parent)}")


def test_tp2_serves_greedy_answers_and_stops_every_rank(tmp_path):
    import mindspore as ms

    ms.set_device("CPU")
    model_dir = make_model_dir(tmp_path)
    checkpoint = _checkpoint(model_dir)
    port, logs = free_port(), tmp_path / "logs"
    cmd = msrun_command(SERVE, [checkpoint, "--port", port, "--max-batch", "4",
                                "--max-model-len", "64", "--model-name", "tiny"],
                        log_dir=str(logs), cluster_time_out=60)
    proc = subprocess.Popen(["timeout", "-k", "5", "170", *cmd], cwd=tmp_path, env=msrun_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        want = _reference(model_dir)  # while the ranks start
        pid = _wait_ready(proc, logs / "worker_0.log", time.monotonic() + 150)
        url = f"http://127.0.0.1:{port}"
        got = [None] * len(PROMPTS)

        def ask(i):
            got[i] = _complete(url, PROMPTS[i], stream=i % 2 == 1)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert got == want
        health = get_json(url + "/health")
        assert health["served"] == len(PROMPTS) and health["peak_batch"] > 1, health
        os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # a failure above: msrun's SIGINT handler kills every rank
            proc.send_signal(signal.SIGINT)  # `timeout` passes it on to msrun
            proc.wait(30)
    text = worker_logs(logs)
    assert proc.returncode == 0, out + text
    assert "SIGTERM: stopped accepting" in text
    replayed = re.search(r"rank 1: stopped by rank 0 after (\d+) steps", text)
    assert replayed, text
    # rank 1 ran every prefill and every decode step rank 0 ran, no more
    assert int(replayed.group(1)) == health["steps"] + len(PROMPTS), (replayed.group(0), health)
