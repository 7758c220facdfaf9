"""training/serve.py as a real subprocess (one server shared by the module), driven by the
official ``openai`` client and by raw HTTP: completions and chat, streaming and not, 8
concurrent requests equal to one-at-a-time greedy generation (``models.generate`` in this
process), seeded sampling independent of the batch, every 4xx error case, and SIGTERM shutdown
(the last test: it ends the shared server).
"""
from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.training.serve_fixture import ServerProcess, get_json, make_model_dir

openai = pytest.importorskip("openai")

NAME = "tiny"
# Two prompt lengths (6 and 11 tokens) and one answer length keep the reference's compilations few.
PROMPTS = ["def f(", "Hello,", "x = [1", "import", "def add(a, ", "The quick b", "while True:",
           "  return x\n"]
N = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, "--max-batch", "4", "--max-model-len", "96",
                        "--model-name", NAME, log=model_dir.parent / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def loaded(model_dir):
    """``(model, tokenizer)`` of the served directory, in this process."""
    import mindspore as ms

    ms.set_device("CPU")
    from training.generate import load

    return load(str(model_dir))


@pytest.fixture(scope="module")
def greedy(loaded):
    """``greedy(prompt) -> (text, finish_reason)`` of ``N`` tokens: ``models.generate`` (compiled,
    one prompt at a time) in this process."""
    import models

    model, tok = loaded

    def run(prompt: str):
        new = models.generate(model, [tok.encode(prompt)], N, stop_tokens=[tok.eod_id],
                              compiled=True)[0]
        stopped = new[-1] == tok.eod_id
        return tok.decode(new[:-1] if stopped else new), "stop" if stopped else "length"
    return run


def post(server, path: str, body, raw: bytes | None = None):
    """``(status, text)`` of a POST with a JSON body (or ``raw`` bytes)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sse_events(text: str) -> list:
    """The ``data:`` payloads of an event stream; asserts it ends with ``[DONE]``."""
    lines = [ln for ln in text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), text
    payloads = [ln[len("data: "):] for ln in lines]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_health_and_models(server):
    assert get_json(server.url + "/health")["status"] == "ok"
    models = get_json(server.url + "/v1/models")
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]


def test_completion_with_openai_client_equals_greedy(client, greedy):
    out = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=N, temperature=0)
    text, finish = greedy(PROMPTS[0])
    assert out.choices[0].text == text and out.choices[0].finish_reason == finish
    assert out.object == "text_completion"
    assert out.usage.prompt_tokens == len(PROMPTS[0])  # one token per character here
    assert out.usage.completion_tokens == len(text) + (finish == "stop")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streaming_completion_openai_and_raw(server, client, greedy):
    text, finish = greedy(PROMPTS[1])
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=N,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(PROMPTS[1])
    status, body = post(server, "/v1/completions", {"model": NAME, "prompt": PROMPTS[1],
                                                    "max_tokens": N, "temperature": 0,
                                                    "stream": True})
    events = sse_events(body)
    assert status == 200 and len(events) > 2  # streamed piece by piece, not in one chunk
    assert "".join(e["choices"][0]["text"] for e in events) == text
    assert events[-1]["choices"][0]["finish_reason"] == finish


def test_chat_default_template_streaming_and_not(server, client, greedy):
    from training.data.chat import load_template

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text, finish = greedy(load_template(None, "").render(messages, add_generation_prompt=True))
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N,
                                         temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == finish
    stream = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=N,
                                                 temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    assert stream[-1].choices[0].finish_reason == finish
    status, body = post(server, "/v1/chat/completions", {"model": NAME, "messages": messages,
                                                         "max_tokens": N, "temperature": 0})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == text


def test_eight_concurrent_requests_equal_one_at_a_time(server, client, greedy):
    before = get_json(server.url + "/health")
    results = [None] * len(PROMPTS)

    def ask(i):
        out = client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=N,
                                        temperature=0)
        results[i] = (out.choices[0].text, out.choices[0].finish_reason)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == [greedy(p) for p in PROMPTS]
    after = get_json(server.url + "/health")
    assert after["served"] - before["served"] == len(PROMPTS)
    assert after["peak_batch"] >= 2  # the requests really shared decode steps


def test_seeded_sampling_does_not_depend_on_the_batch(client):
    def sample(seed):
        return client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=16,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    alone = sample(7)
    together = [None] * 4

    def ask(i):
        together[i] = sample(7) if i == 0 else client.completions.create(
            model=NAME, prompt=PROMPTS[i], max_tokens=16, temperature=0.8, seed=i).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert together[0] == alone
    assert sample(8) != alone  # the seed matters


def test_a_cancelled_request_leaves_the_batch(loaded):
    """In-process engine (PyNative): a request whose client went away frees its row at the next
    token and is not counted as served; the one beside it runs to its end."""
    from training.serving.engine import Engine, Request, SamplingParams

    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, max_len=32, compiled=False)
    gone, kept = [], []
    first = Request(tok.encode(PROMPTS[0]), SamplingParams(20, temperature=0), gone.append)
    second = Request(tok.encode(PROMPTS[1]), SamplingParams(4, temperature=0), kept.append)

    def leave(event):
        gone.append(event)
        first.cancelled = True

    first.emit = leave
    loop = threading.Thread(target=engine.run)
    loop.start()
    engine.submit(first)
    engine.submit(second)
    deadline = time.monotonic() + 120
    while not (kept and kept[-1].finish_reason) and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.close()
    loop.join(60)
    assert len(gone) <= 2 and all(e.finish_reason is None for e in gone)
    assert kept[-1].finish_reason is not None and engine.stats["served"] == 1
    assert engine.status()["running"] == 0


ERRORS = [  # (body or raw bytes, status, param, code)
    ({"model": "gpt-4", "prompt": "a"}, 404, "model", "model_not_found"),
    ({"model": NAME, "prompt": "a" * 100}, 400, "prompt", "context_length_exceeded"),
    ({"model": NAME, "prompt": "a", "max_tokens": 96}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"model": NAME, "prompt": "a", "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": NAME, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ({"model": NAME, "prompt": "a", "n": 2}, 400, "n", "unsupported"),
    ({"model": NAME, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "invalid_value"),
    ({"model": NAME, "prompt": "a", "logprobs": 2}, 400, "logprobs", "unsupported"),
    ({"model": NAME}, 400, "prompt", "invalid_value"),
    (b'{"model": "tiny", "prompt": ', 400, None, "invalid_json"),
]


@pytest.mark.parametrize("body,status,param,code", ERRORS)
def test_bad_requests_get_openai_errors(server, body, status, param, code):
    raw = body if isinstance(body, bytes) else None
    got, text = post(server, "/v1/completions", body, raw=raw)
    err = json.loads(text)["error"]
    assert (got, err["param"], err["code"]) == (status, param, code)
    assert err["type"] == "invalid_request_error" and err["message"]


def test_errors_through_the_client_and_chat(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=NAME,
                                       messages=[{"role": "user", "content": "a" * 100}])
    got, text = post(server, "/v1/unknown", {})
    assert got == 404 and "error" in json.loads(text)
    assert get_json(server.url + "/health")["status"] == "ok"  # still serving


def test_sigterm_finishes_running_requests_and_exits_0(server, client, greedy):
    text, _ = greedy(PROMPTS[4])
    stream = client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=N,
                                       temperature=0, stream=True)
    pieces = [next(stream).choices[0].text]  # the request is running
    server.proc.send_signal(signal.SIGTERM)
    pieces += [c.choices[0].text for c in stream]
    assert "".join(pieces) == text  # finished, not cut
    assert server.proc.wait(60) == 0
    assert "SIGTERM: stopped accepting" in server.log.read_text()
    with pytest.raises(OSError):
        get_json(server.url + "/health")
