"""Serving pieces without a model: stop strings in a token stream, chat templates, request
validation, and the one-line refusal of a multi-rank launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.multirank import REPO_ROOT
from training.data.chat import load_template
from training.serving.protocol import APIError, parse_chat, parse_completion
from training.serving.text_stream import TextStream


def _stream(text: str, stop):
    """Push ``text`` one character (= one token) at a time: ``(deltas, stopped)``."""
    s = TextStream(lambda ids: "".join(map(chr, ids)), stop)
    deltas = []
    for ch in text:
        delta, stopped = s.push(ord(ch))
        deltas.append(delta)
        if stopped:
            return deltas, True
    return deltas + [s.flush()], False


@pytest.mark.parametrize("text,stop,out,stopped", [
    ("hello world", [], "hello world", False),
    ("abc<END>xyz", ["<END>"], "abc", True),
    ("ab<EN", ["<END>"], "ab<EN", False),  # a stop prefix at the end is released by flush
    ("a<b<END", ["<END>", "<b"], "a", True),  # the earliest stop string wins
    ("x\n\ny", ["\n\n"], "x", True),
])
def test_text_stream_cuts_before_the_first_stop_string(text, stop, out, stopped):
    deltas, got_stopped = _stream(text, stop)
    assert "".join(deltas) == out and got_stopped == stopped


def test_text_stream_holds_back_a_possible_stop_prefix():
    deltas, _ = _stream("ab<ENxy", ["<END>"])
    assert deltas[:5] == ["a", "b", "", "", ""]  # "<", "<E", "<EN" could start "<END>"
    assert deltas[5] == "<ENx"


def test_chat_template_from_tokenizer_config(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    fmt = load_template(tmp_path, "</s>")
    msgs = [{"role": "user", "content": "hi"}]
    assert fmt.render(msgs, add_generation_prompt=True) == "<s>[user]hi[assistant]"
    assert fmt.origin.endswith("tokenizer_config.json")
    default = load_template(tmp_path / "missing", "</s>")
    assert default.origin == "default"
    assert default.render(msgs, add_generation_prompt=True) == "<|user|>\nhi\n<|assistant|>\n"


def test_request_validation_defaults_and_errors():
    prompt, opts = parse_completion({"model": "m", "prompt": ["p"], "stop": "\n"}, "m")
    assert (prompt, opts["max_tokens"], opts["temperature"], opts["stop"]) == ("p", 16, 1.0,
                                                                                ("\n",))
    msgs, opts = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}],
                             "max_completion_tokens": 5, "seed": 3}, "m")
    assert opts["max_tokens"] == 5 and opts["seed"] == 3
    with pytest.raises(APIError) as err:
        parse_completion({"model": "m", "prompt": "p", "seed": 1.5}, "m")
    assert err.value.status == 400 and err.value.param == "seed"
    with pytest.raises(APIError) as err:
        parse_chat({"model": "m", "messages": []}, "m")
    assert err.value.param == "messages"
    with pytest.raises(APIError) as err:
        parse_completion(["not", "an", "object"], "m")
    assert err.value.code == "invalid_json"


def test_a_multi_rank_launch_with_a_bad_source_fails_before_communication():
    env = {**os.environ, "MS_WORKER_NUM": "2"}  # as msrun sets it; init() would wait for peers
    out = subprocess.run([sys.executable, str(REPO_ROOT / "training" / "serve.py"), "nowhere"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("load error:") and "'nowhere'" in out.stderr


def test_a_template_that_refuses_the_messages_is_a_400(tmp_path):
    from training.serving import protocol as api
    from training.serving.app import _render

    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    fmt = load_template(tmp_path, "</s>")
    assert _render(fmt, [{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(api.APIError) as err:
        _render(fmt, [{"role": "system", "content": "x"}])
    assert err.value.status == 400 and err.value.param == "messages"
    assert "no system role" in err.value.message
