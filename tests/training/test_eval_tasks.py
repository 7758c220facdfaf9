"""training/evaluate.py --tasks: multiple-choice accuracy by log-likelihood and exact match of
greedy answers, on the tiny Llama fixture with a one-letter-per-token tokenizer.

The expected numbers are computed here another way: each choice's log-likelihood from the
model's own per-token cross-entropy (``model(ids, labels=...)``, the vocab-parallel loss) on
the unpadded sequence, and the greedy answers from ``models.generate`` on token ids.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.training.test_generate_cli import LLAMA, _letter, write_tokenizer
from tests.multirank import REPO_ROOT

EVALUATE = str(REPO_ROOT / "training" / "evaluate.py")


def _word(*ids: int) -> str:
    return "".join(_letter(i) for i in ids)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("evaltasks") / "llama"
    shutil.copytree(LLAMA, d)
    write_tokenizer(d / "tokenizer.json", 256)
    return d


def _independent_ll(model, context: list[int], choice: list[int]) -> float:
    """-sum of the model's cross-entropy over the choice tokens (no batching, no padding)."""
    import mindspore as ms

    ids = np.array([context + choice[:-1]], np.int32)  # inputs; labels are the next tokens
    labels = np.array([context[1:] + choice], np.int32)
    loss = model(ms.Tensor(ids), labels=ms.Tensor(labels)).asnumpy()[0]  # [s] per-token CE
    return -float(loss[len(context) - 1:].astype(np.float64).sum())


def test_scores_match_an_independent_computation(hf_dir, tmp_path):
    import mindspore as ms

    import models
    from training.data.tokenizer import load_tokenizer
    from training.eval_tasks import load_tasks, run

    ms.set_context(mode=ms.PYNATIVE_MODE)
    model, tok = models.from_pretrained(hf_dir), load_tokenizer(hf_dir / "tokenizer.json")
    contexts = [[5, 9, 200, 31], [77, 12, 3], [40, 41, 42, 43, 44]]
    choices = [[[7], [8, 9, 10], [100, 3]], [[1, 2], [250]], [[60, 61], [62], [63, 64, 65]]]
    lines, want_acc, want_norm, want_ll = [], [], [], []
    for k, (ctx, chs) in enumerate(zip(contexts, choices)):
        ll = [_independent_ll(model, ctx, c) for c in chs]
        want_ll.append(ll)
        norm = [v / len(_word(*c).encode()) for v, c in zip(ll, chs)]
        answer = int(np.argmax(ll)) if k != 1 else int(np.argmin(ll))  # item 1: a miss
        want_acc.append(int(np.argmax(ll)) == answer)
        want_norm.append(int(np.argmax(norm)) == answer)
        lines.append({"context": _word(*ctx), "choices": [_word(*c) for c in chs],
                      "answer": answer if k != 2 else _word(*chs[answer])})
    prompts = [[5, 9, 200], [77, 12]]
    greedy = [models.generate(model, np.array([p], np.int32), max_new_tokens=4)[0] for p in prompts]
    texts = [tok.decode(list(g)) for g in greedy]
    lines.append({"prompt": _word(*prompts[0]), "answer": ["zzz", " " + texts[0].upper() + "."]})
    lines.append({"prompt": _word(*prompts[1]), "answer": texts[1] + _letter(3)})
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = run(load_tasks(path), model, tok, max_new_tokens=4)
    mc = res["tasks"]["multiple_choice"]
    assert mc["n"] == 3 and mc["acc"] == pytest.approx(np.mean(want_acc))
    assert mc["acc_norm"] == pytest.approx(np.mean(want_norm)) and 0 < mc["acc"] < 1
    for rec, want in zip(res["items"], want_ll):
        np.testing.assert_allclose(rec["loglikelihoods"], want, rtol=1e-5, atol=1e-4)
    gen = res["tasks"]["generation"]
    assert gen["n"] == 2 and gen["exact_match"] == 0.5, res["items"][-2:]


def _cli(args, cwd):
    return subprocess.run([sys.executable, EVALUATE, *map(str, args)], capture_output=True,
                          text=True, timeout=240, cwd=cwd)


def test_cli_prints_a_table_and_writes_json(hf_dir, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"context": _word(5, 6), "choices": [_word(7), _word(8)],
                                "answer": 0, "id": "q1"}) + "\n"
                    + json.dumps({"prompt": _word(9), "answer": "x"}) + "\n")
    res = _cli(["--tasks", path, "--model", hf_dir, "--output", tmp_path / "r.json",
                "--max-new-tokens", "2"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    head = res.stdout.splitlines()
    assert head[0].split() == ["task", "items", "metric", "value"]
    assert any(line.split()[:3] == ["multiple_choice", "1", "acc_norm"] for line in head)
    assert any(line.split()[:3] == ["generation", "1", "exact_match"] for line in head)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["tasks"]) == {"multiple_choice", "generation"}
    assert saved["items"][0]["id"] == "q1" and len(saved["items"][0]["loglikelihoods"]) == 2


@pytest.mark.parametrize("line, message", [
    ("{not json", ":1: not JSON"),
    ('{"context": "a", "choices": ["b"], "answer": 0}', "'choices' must be a list of at least two"),
    ('{"context": "a", "choices": ["b", "c"], "answer": 2}', "'answer' must be the index (0..1)"),
    ('{"context": "a", "choices": ["b", "c"], "answer": "d"}', "'answer' must be the index"),
    ('{"prompt": "a", "answer": 3}', "'answer' must be a string or a list of strings"),
    ('{"question": "a"}', "needs 'context'"),
    ("", "no items"),
])
def test_bad_task_files_raise_one_data_error(tmp_path, line, message):
    from training.errors import DataError
    from training.eval_tasks import load_tasks

    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError) as exc:
        load_tasks(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_cli_bad_file_is_one_line_before_the_model(hf_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"]}\n')
    res = _cli(["--tasks", path, "--model", hf_dir], tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("data error: ") and f"{path}:1:" in lines[0], lines
