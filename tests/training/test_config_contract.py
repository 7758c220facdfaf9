"""The entry point's one-line contract under generated bad input.

``training.pretrain.config_or_exit(argv)`` (what pretrain / evaluate / generate call first) either
returns a ``Config`` or exits with status 2 after printing exactly one line on stderr,
``<kind> error: ...`` (config, data, checkpoint or load: ``training.errors``) -- for unknown keys,
wrong types, sizes that do not divide, negative and garbage values, duplicated YAML keys, odd
rotary widths, bad files -- never another exception.
Hypothesis generates the input and calls the parser in-process (fast); two subprocess runs of
``training/pretrain.py`` check the same contract for real (exit 2, one line, no Traceback).
"""
import io
import re
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from training.config import SECTIONS, Config, schema_rows
from training.pretrain import check_data, config_or_exit

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = str(ROOT / "training" / "pretrain.py")
KEYS = sorted(key for key, *_ in schema_rows())
INT_KEYS = sorted(key for key, typ, *_ in schema_rows() if typ.startswith("int"))
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


USER_ERROR = re.compile(r"^(config|data|checkpoint|load) error: \S")  # training.errors' kinds


def outcome(argv: list[str]):
    """``("ok", Config)`` or ``("exit", the one stderr line)``; anything else fails the test."""
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            cfg = config_or_exit(argv)
        except SystemExit as exc:
            assert exc.code == 2, exc.code
            lines = err.getvalue().splitlines()
            assert len(lines) == 1 and USER_ERROR.match(lines[0]), err.getvalue()
            return "exit", lines[0]
    assert isinstance(cfg, Config) and err.getvalue() == ""
    return "ok", cfg


def refused(argv: list[str], *names: str) -> str:
    kind, line = outcome(argv)
    assert kind == "exit", f"{argv} was accepted"
    for name in names:
        assert name in line, (name, line)
    return line


_IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
# Values YAML reads as anything: words, numbers, lists, mappings, YAML syntax, control chars.
_GARBAGE = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["[", "{", "]", "}", ":", "- -", "&a", "*a", "!!python/object:os.system",
                     "{a: 1, a: 2}", "'", '"', "\\x00", '"\\0"', "~", ".nan", "-.inf", "1e999",
                     "0x1F", "0o7", "2020-01-01", "[1, [2]]", "{x: {y: z}}", "null", "yes",
                     str(10 ** 40), "-" + str(10 ** 40)]),
    st.integers(-10 ** 6, 10 ** 6).map(str), st.floats(allow_nan=True).map(repr))


@SETTINGS
@given(section=st.sampled_from(sorted(SECTIONS) + ["modle", "x"]), name=_IDENT,
       value=st.integers(-9, 9))
def test_unknown_keys_exit_naming_the_key(section, name, value):
    key = f"{section}.{name}"
    if key in KEYS:
        return
    refused([f"{key}={value}"], f"'{key}'")


@SETTINGS
@given(key=st.sampled_from(KEYS), value=_GARBAGE)
def test_garbage_values_never_escape_the_contract(key, value):
    kind, line = outcome([f"{key}={value}"])
    if kind == "exit":
        assert key in line or "cannot parse value" in line, line


@SETTINGS
@given(key=st.sampled_from(INT_KEYS), value=st.integers(-10 ** 9, -1))
def test_negative_sizes_exit_naming_the_key(key, value):
    refused([f"{key}={value}"], key)


@SETTINGS
@given(items=st.lists(st.tuples(st.sampled_from(KEYS), _GARBAGE), min_size=1, max_size=4),
       extra=st.lists(st.sampled_from(["--tp", "--config", "=", "x", "a.b.c=1", "--config="]),
                      max_size=2))
def test_mixed_argument_lists_never_escape_the_contract(items, extra):
    outcome([f"{k}={v}" for k, v in items] + extra)


@SETTINGS
@given(tp=st.integers(2, 8), kv=st.integers(1, 8), group=st.integers(1, 4),
       hidden_mult=st.integers(1, 12), world_mult=st.integers(1, 2))
def test_sizes_that_do_not_divide_or_odd_rotary(tp, kv, group, hidden_mult, world_mult,
                                                monkeypatch):
    heads = kv * group
    argv = [f"model.num_heads={heads}", f"model.num_kv_heads={kv}",
            f"model.hidden_size={heads * hidden_mult}", "model.ffn_hidden_size=840",
            f"parallel.tp={tp}"]
    monkeypatch.setenv("MS_WORKER_NUM", str(tp * world_mult))  # the launcher's world size
    kind, line = outcome(argv)
    if heads % tp or kv % tp:
        assert kind == "exit" and "parallel.tp" in line and "model.num" in line, line
    monkeypatch.setenv("MS_WORKER_NUM", "1")
    kind, line = outcome(argv[:-1])  # tp 1: only the model sizes can be wrong
    if hidden_mult % 2:  # odd head_dim: no rotary pairs
        assert kind == "exit" and "gives head_dim" in line and "model.hidden_size" in line, line
    else:
        assert kind == "ok", line


@SETTINGS
@given(section=st.sampled_from(sorted(SECTIONS)), key=st.sampled_from(["seed", "lr", "tp", "a"]),
       first=st.integers(0, 9), second=st.integers(0, 9), gap=st.integers(0, 3))
def test_duplicated_yaml_keys_name_key_and_lines(tmp_path_factory, section, key, first, second, gap):
    lines = [f"{section}:", f"  {key}: {first}"] + [f"  # note {i}" for i in range(gap)] \
        + [f"  {key}: {second}"]
    path = tmp_path_factory.mktemp("dup") / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    line = refused(["--config", str(path)], str(path), f"duplicated key '{key}'",
                   f"on line {3 + gap}", "first on line 2")
    assert "\n" not in line


@SETTINGS
@given(blob=st.binary(min_size=1, max_size=64))
def test_bytes_files_never_escape_the_contract(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("blob") / "c.yaml"
    path.write_bytes(b"training:\n  seed: 1\n" + blob)
    kind, line = outcome(["--config", str(path)])
    if kind == "exit":  # it names the file, a training key, or an unknown key the file holds
        unknown = re.match(r"config error: unknown key '(.+?)'", line)
        named = unknown is not None and unknown.group(1) in blob.decode("utf-8", "replace")
        assert str(path) in line or "training." in line or named, line


def test_file_errors_name_the_file(tmp_path):
    refused(["--config", str(tmp_path)], str(tmp_path), "is a directory")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("training:\n  seed: 1\n# caf\xe9\n".encode("latin-1"))
    refused(["--config", str(bad)], str(bad), "not UTF-8", "line 3")
    refused(["--config", str(tmp_path / "none.yaml")], "does not exist")


def test_tokenizer_larger_than_vocab_is_refused_at_parse_time(tmp_path):
    from training.data.tokenizer import train_bpe

    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 50)
    tok = train_bpe([text], 300, save_path=tmp_path / "tok.json")
    assert tok.vocab_size > 256
    refused([f"data.tokenizer={tmp_path / 'tok.json'}", "model.vocab_size=256"],
            "model.vocab_size=256 is smaller than", "tok.json")
    assert outcome([f"data.tokenizer={tmp_path / 'tok.json'}", "model.vocab_size=512"])[0] == "ok"
    refused([f"data.tokenizer={tmp_path / 'missing.json'}"], "data.tokenizer")
    (tmp_path / "junk.json").write_text("{]")
    refused([f"data.tokenizer={tmp_path / 'junk.json'}"], "data.tokenizer", "junk.json")


def test_vocab_too_small_for_the_tokenizer_the_run_trains_is_refused_at_parse_time():
    """Without data.tokenizer the run trains a byte-level BPE of model.vocab_size tokens: never
    more than that, but it needs 258 (EOD, 256 bytes, one merge)."""
    refused(["model.vocab_size=256"], "model.vocab_size=256", "data.tokenizer", ">= 258")
    assert outcome(["model.vocab_size=258"])[0] == "ok"


def test_zero_valid_fraction_logs_that_validation_is_off():
    from types import SimpleNamespace

    _, cfg = outcome(["data.valid_fraction=0"])
    said = []
    data = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=100), eval_batches=None)
    check_data(cfg, data, said.append)
    assert len(said) == 1 and "data.valid_fraction=0" in said[0] and "validation is off" in said[0]
    data.eval_batches = object()
    said.clear()
    check_data(cfg, data, said.append)
    assert said == []


def test_zero_eval_iters_is_accepted_and_logs_that_validation_is_off():
    """``training.eval_iters=0``: validation off without touching the split (``evaluate.py``
    reads it as the whole split, tests/training/test_pretrain.py); negative values are refused."""
    from types import SimpleNamespace

    _, cfg = outcome(["training.eval_iters=0", "training.eval_interval=5"])
    said = []
    check_data(cfg, SimpleNamespace(eval_batches=object()), said.append)
    assert said == ["training.eval_iters=0: validation is off"]
    refused(["training.eval_iters=-1"], "training.eval_iters", ">= 0")


@pytest.mark.parametrize("content, argv, key", [
    (None, [], "is a directory"),
    ("model:\n  hidden_size: 12\n  num_heads: 4\n  num_kv_heads: 4\n", [], "model.hidden_size=12"),
    ("optimizer:\n  lr: 0.1\n  lr: 0.2\n", [], "duplicated key 'lr' on line 3"),
])
def test_pretrain_script_exits_2_with_one_line(tmp_path, content, argv, key):
    path = tmp_path
    if content is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(content)
    res = subprocess.run([sys.executable, PRETRAIN, "--config", str(path), *argv,
                          f"logging.output_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and key in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "out").exists()
