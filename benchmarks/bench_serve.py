"""Served tokens/s and time to first token (TTFT) for 1, 4 and 16 concurrent clients, against
one-at-a-time generation of the same requests on the same model in the same run.

Model: a random Llama (hidden 256, 4 layers, 8 heads / 4 kv heads, vocabulary 256, the
ASCII tokenizer of ``tests/training/serve_fixture.py``) saved as a HF directory. Each client
sends ``REQUESTS_PER_CLIENT`` streaming completions (a 16-token prompt, ``NEW`` greedy tokens)
one after the other to ``training/serve.py --max-batch 16`` (a subprocess); TTFT is measured
by the client (request sent -> first text chunk), tokens/s = completion tokens (from ``usage``)
/ wall time of the whole burst.

Reference ("one at a time"): ``models.generate(..., compiled=True)`` in this process, one
request after the other (compilation excluded). Its TTFT for ``c`` clients is what a queue
would give: request ``i`` waits for the ``i`` before it, then its first token (a 1-token
generation). Ratios > 1 mean the server is faster / answers sooner.

    .venv/bin/python -m pytest benchmarks/bench_serve.py -s
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from tests.training.serve_fixture import (LLAMA, ServerProcess, write_ascii_tokenizer)

ms = pytest.importorskip("mindspore")
pytest.importorskip("uvicorn")

CLIENTS = (1, 4, 16)
REQUESTS_PER_CLIENT = 2
PROMPT, NEW = 16, 32
SIZES = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
         "max_position_embeddings": 512}


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(chr(c) for c in rng.integers(97, 123, PROMPT)) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from models.hf import build_from_config, read_config

    ms.set_device("CPU")
    d = tmp_path_factory.mktemp("bench_serve") / "llama256"
    hf = {**read_config(LLAMA), **SIZES}
    build_from_config(hf).save_pretrained(d)
    write_ascii_tokenizer(d / "tokenizer.json")
    return d


def _stream(url: str, prompt: str) -> tuple[float, float, int]:
    """``(ttft, total seconds, completion tokens)`` of one streaming completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": NEW, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or time.perf_counter() - t0, time.perf_counter() - t0, tokens


def _served(url: str, clients: int) -> tuple[float, float]:
    """``(tokens/s, mean TTFT)`` of ``clients`` concurrent clients."""
    prompts = _prompts(clients * REQUESTS_PER_CLIENT, seed=clients)
    results = []

    def client(i):
        for p in prompts[i::clients]:
            results.append(_stream(url, p))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(r[2] for r in results) / wall, float(np.mean([r[0] for r in results]))


def _one_at_a_time(model_dir, clients: int) -> tuple[float, float]:
    """``(tokens/s, mean TTFT)`` of the same requests generated one after the other."""
    import models
    from training.generate import load

    model, tok = load(str(model_dir))
    prompts = _prompts(clients * REQUESTS_PER_CLIENT, seed=clients)
    ids = [tok.encode(p) for p in prompts]
    for n in (1, NEW):  # compile both lengths' graphs
        models.generate(model, [ids[0]], n, stop_tokens=[tok.eod_id], compiled=True)
    t0 = time.perf_counter()
    tokens = sum(len(models.generate(model, [x], NEW, stop_tokens=[tok.eod_id], compiled=True)[0])
                 for x in ids)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    models.generate(model, [ids[0]], 1, compiled=True)
    first = time.perf_counter() - t1
    per_request = wall / len(ids)
    # request i (of the ``clients`` sent at once) waits for the ones before it in the queue
    ttft = float(np.mean([(i % clients) * per_request + first for i in range(len(ids))]))
    return tokens / wall, ttft


def test_served_vs_one_at_a_time(model_dir):
    server = ServerProcess(model_dir, "--max-batch", "16", "--max-model-len", "64",
                           "--model-name", "bench", log=model_dir.parent / "server.log")
    try:
        _stream(server.url, _prompts(1)[0])  # warm the prefill bucket
        served = {c: _served(server.url, c) for c in CLIENTS}
    finally:
        assert server.stop() == 0
    print(f"\nserve: hidden 256, 4 layers, prompt {PROMPT}, {NEW} new tokens, "
          f"{REQUESTS_PER_CLIENT} requests per client")
    print(f"{'clients':>7} {'served tok/s':>12} {'1-at-a-time':>11} {'ratio':>6} "
          f"{'TTFT served':>11} {'1-at-a-time':>11} {'ratio':>6}")
    for c in CLIENTS:
        ref_tps, ref_ttft = _one_at_a_time(model_dir, c)
        tps, ttft = served[c]
        print(f"{c:>7} {tps:>12.1f} {ref_tps:>11.1f} {tps / ref_tps:>6.2f} "
              f"{ttft * 1e3:>9.0f}ms {ref_ttft * 1e3:>9.0f}ms {ref_ttft / ttft:>6.2f}")
        assert tps > 0 and ttft > 0
