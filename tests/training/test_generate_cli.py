"""training/generate.py: top-k, stop strings, batches of prompts, tokens/s, and one-line errors
(missing tokenizer, tokenizer larger than the model's vocabulary, a source that is no model).

The model is the tiny Llama fixture (vocabulary 256); its tokenizer here maps id 0 to the
end-of-document token and ids 1..255 to one letter each, so every generated id decodes to text.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models as tok_models

from tests.multirank import REPO_ROOT

LLAMA = REPO_ROOT / "tests" / "fixtures" / "hf" / "llama"
GENERATE = str(REPO_ROOT / "training" / "generate.py")


def _letter(i: int) -> str:
    return chr(0x100 + i)


def write_tokenizer(path: Path, size: int) -> Path:
    """``size`` tokens: ``<|endoftext|>`` (id 0) and one letter per further id."""
    vocab = {"<|endoftext|>": 0, **{_letter(i): i for i in range(1, size)}}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """The llama fixture with a fitting ``tokenizer.json`` beside its weights."""
    d = tmp_path_factory.mktemp("gen") / "llama"
    shutil.copytree(LLAMA, d)
    write_tokenizer(d / "tokenizer.json", 256)
    return d


@pytest.fixture(scope="module")
def loaded(hf_dir):
    import mindspore as ms

    ms.set_device("CPU")
    from training.generate import load

    return load(str(hf_dir))


PROMPTS = [_letter(5) + _letter(9) + _letter(200), _letter(77) + _letter(12)]


def test_top_k_1_sampling_equals_greedy(loaded):
    from training.generate import generate_texts

    model, tok = loaded
    greedy, n = generate_texts(model, tok, PROMPTS, max_new_tokens=4)
    sampled, _ = generate_texts(model, tok, PROMPTS, max_new_tokens=4, temperature=1.5, top_k=1,
                                seed=11)
    assert sampled == greedy and n == 8
    wide, _ = generate_texts(model, tok, PROMPTS, max_new_tokens=4, temperature=5.0, seed=11)
    assert wide != greedy  # sampling without top-k does move away from greedy here


def test_batch_of_prompts_equals_each_alone(loaded):
    from training.generate import generate_text, generate_texts

    model, tok = loaded
    together, _ = generate_texts(model, tok, PROMPTS, max_new_tokens=3)
    assert together == [generate_text(model, tok, p, max_new_tokens=3) for p in PROMPTS]


def test_stop_strings_cut_the_generated_text(loaded):
    from training.generate import generate_text

    model, tok = loaded
    prompt = PROMPTS[0]
    full = generate_text(model, tok, prompt, max_new_tokens=6)
    gen = full[len(prompt):]
    assert len(gen) == 6
    cut = generate_text(model, tok, prompt, max_new_tokens=6, stop=[gen[3:5]])
    assert cut == prompt + gen[:gen.index(gen[3:5])] and len(cut) < len(full)
    earliest = generate_text(model, tok, prompt, max_new_tokens=6, stop=[gen[4:], gen[1:3]])
    assert earliest == prompt + gen[:gen.index(gen[1:3])]
    # A stop string inside the prompt does not cut it.
    assert generate_text(model, tok, prompt, max_new_tokens=6, stop=[prompt[:2]]) == full


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, GENERATE, *args], capture_output=True, text=True,
                          timeout=240, cwd=cwd, env=dict(os.environ, GLOG_v="3"))


def test_cli_batch_top_k_stop_and_tokens_per_s(hf_dir, loaded, tmp_path):
    from training.generate import SEPARATOR, generate_texts

    model, tok = loaded
    prompts = PROMPTS + [_letter(40) + _letter(41)]
    (tmp_path / "prompts.txt").write_text(prompts[2] + "\n\n")
    full, n = generate_texts(model, tok, prompts, max_new_tokens=5)
    stop = full[1][len(prompts[1]) + 2]  # the third generated letter of the second prompt
    res = _cli([str(hf_dir), "--prompt", prompts[0], "--prompt", prompts[1], "--prompt-file",
                str(tmp_path / "prompts.txt"), "--max-new-tokens", "5", "--temperature", "0.7",
                "--top-k", "1", "--stop", stop], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    texts = res.stdout.rstrip("\n").split(f"\n{SEPARATOR}\n")
    expected, _ = generate_texts(model, tok, prompts, max_new_tokens=5, stop=[stop])
    assert texts == expected and texts[1] != full[1]
    m = re.fullmatch(r"(\d+) new tokens in [\d.]+ s \(([\d.]+) tokens/s\)", res.stderr.strip())
    assert m, res.stderr
    assert int(m.group(1)) == n and float(m.group(2)) > 0


def _assert_one_line(res, kind: str, *names: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"{kind} error: ") and "Traceback" not in res.stderr, lines
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_cli_errors_are_one_line(hf_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(LLAMA, bare)  # no tokenizer.json
    _assert_one_line(_cli([str(bare)], tmp_path), "data", str(bare / "tokenizer.json"),
                     "--tokenizer")
    big = write_tokenizer(tmp_path / "big.json", 300)
    _assert_one_line(_cli([str(hf_dir), "--tokenizer", str(big)], tmp_path), "data", str(big),
                     "300 tokens", "256")
    _assert_one_line(_cli([str(tmp_path / "nowhere")], tmp_path), "load", "nowhere")
    _assert_one_line(_cli([str(hf_dir), "--prompt-file", str(tmp_path / "none.txt")], tmp_path),
                     "data", "--prompt-file", "none.txt")
