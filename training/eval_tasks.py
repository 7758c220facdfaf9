"""Task evaluation on a JSON Lines file: multiple choice by log-likelihood, exact match by greedy
generation (``python training/evaluate.py --tasks FILE --model SOURCE``; one process).

Each line of ``FILE`` is one JSON object, of one of two kinds (both may be mixed in one file):

- multiple choice: ``{"context": str, "choices": [str, ...], "answer": int | str}`` (``answer``:
  the index of the right choice, or its text). Each choice is scored by the sum of its tokens'
  log-probabilities given the context, ``sum_t log p(c_t | context, c_<t)`` (context and choice
  are tokenised separately and concatenated, so a choice usually starts with a space). ``acc``:
  the highest sum is the answer; ``acc_norm``: the highest sum divided by the choice's length in
  UTF-8 bytes is (the length-normalised score common evaluation harnesses report).
- generation: ``{"prompt": str, "answer": str | [str, ...]}``: greedy continuation of the
  prompt, at most ``--max-new-tokens`` tokens, cut at the first newline or ``--stop`` string;
  ``exact_match`` when it equals an answer after ``normalize`` (lower case, punctuation and the
  articles a / an / the removed, whitespace collapsed).

Optional ``"id"`` fields are kept in the per-item records. Results: a table on stdout (task,
items, metric, value) and, with ``--output FILE``, JSON ``{"source", "file", "tasks": {...},
"items": [...]}``. The model: a Hugging Face directory or a training checkpoint / run directory
(``training.generate.load``), plus ``--adapter DIR`` (a PEFT LoRA adapter, ``models.peft``).
Bad input (a line that is not JSON, a missing or mistyped field, an answer that is not one of
the choices, an empty file) prints ``data error: FILE:LINE: ...`` and exits 2 before the model
is built.
"""
from __future__ import annotations

import argparse
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import DataError


@dataclass
class Tasks:
    """The parsed file: multiple-choice and generation items, each with its line number."""

    choice: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)


def _fail(path, line: int, message: str):
    raise DataError(f"{path}:{line}: {message}")


def _choice_item(path, n: int, obj: dict) -> dict:
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, str) and c for c in choices):
        _fail(path, n, "'choices' must be a list of at least two non-empty strings")
    if not isinstance(obj["context"], str):
        _fail(path, n, "'context' must be a string")
    answer = obj.get("answer")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        _fail(path, n, f"'answer' must be the index (0..{len(choices) - 1}) or the text of one "
                       f"of the choices, got {answer!r}")
    return {"line": n, "id": obj.get("id"), "context": obj["context"], "choices": choices,
            "answer": answer}


def _generation_item(path, n: int, obj: dict) -> dict:
    answers = obj.get("answer")
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(obj["prompt"], str) or not obj["prompt"]:
        _fail(path, n, "'prompt' must be a non-empty string")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        _fail(path, n, "'answer' must be a string or a list of strings")
    return {"line": n, "id": obj.get("id"), "prompt": obj["prompt"], "answers": answers}


def load_tasks(path) -> Tasks:
    """Parse ``path`` (see the module doc); ``DataError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--tasks '{path}': no such file")
    tasks = Tasks()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(path, n, f"not JSON ({exc.msg})")
        if not isinstance(obj, dict):
            _fail(path, n, "not a JSON object")
        if "context" in obj:
            tasks.choice.append(_choice_item(path, n, obj))
        elif "prompt" in obj:
            tasks.generation.append(_generation_item(path, n, obj))
        else:
            _fail(path, n, "needs 'context' + 'choices' + 'answer' (multiple choice) or "
                           "'prompt' + 'answer' (generation)")
    if not tasks.choice and not tasks.generation:
        raise DataError(f"{path}: no items")
    return tasks


def continuation_logprobs(model, context: list[int], continuations: list[list[int]]) -> list[float]:
    """``sum_t log p(cont_t | context, cont_<t)`` of each continuation (one batch, right-padded:
    a causal model's earlier positions do not see the padding)."""
    import mindspore as ms

    seqs = [context + c for c in continuations]
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), np.int32)  # [n, L]
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    logits = model(ms.Tensor(ids)).asnumpy().astype(np.float64)  # [n, L, V]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))  # log-softmax over V
    out = []
    for i, c in enumerate(continuations):
        start = len(context)  # token at position p is predicted at p - 1
        pos = np.arange(start - 1, start - 1 + len(c))
        out.append(float(logp[i, pos, c].sum()))
    return out


def score_choices(model, tokenizer, items: list[dict]) -> dict:
    """``{"acc", "acc_norm", "n", "items"}`` for multiple-choice ``items``."""
    records, hits, hits_norm = [], 0, 0
    for item in items:
        context = tokenizer.encode(item["context"])
        conts = [tokenizer.encode(c) for c in item["choices"]]
        if not context or not all(conts):
            raise DataError(f"line {item['line']}: the context and every choice must give at "
                            "least one token")
        ll = continuation_logprobs(model, context, conts)
        norm = [v / len(c.encode("utf-8")) for v, c in zip(ll, item["choices"])]
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(norm))
        hits += pred == item["answer"]
        hits_norm += pred_norm == item["answer"]
        records.append({"line": item["line"], "id": item["id"], "kind": "multiple_choice",
                        "loglikelihoods": ll, "prediction": pred, "prediction_norm": pred_norm,
                        "answer": item["answer"]})
    n = len(items)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": n, "items": records}


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles (a / an / the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(model, tokenizer, items: list[dict], max_new_tokens: int = 32, stop=(),
                batch: int = 16) -> dict:
    """``{"exact_match", "n", "items"}``: greedy generations cut at a newline or a ``stop``
    string, compared after ``normalize``."""
    from training.generate import generate_texts

    records, hits = [], 0
    stops = ["\n", *stop]
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        prompts = [it["prompt"] for it in chunk]
        texts, _ = generate_texts(model, tokenizer, prompts, max_new_tokens, stop=stops)
        for item, text in zip(chunk, texts):
            generated = text[len(item["prompt"]):]
            ok = normalize(generated) in {normalize(a) for a in item["answers"]}
            hits += ok
            records.append({"line": item["line"], "id": item["id"], "kind": "generation",
                            "generated": generated, "answers": item["answers"], "correct": ok})
    return {"exact_match": hits / len(items), "n": len(items), "items": records}


def run(tasks: Tasks, model, tokenizer, max_new_tokens: int = 32, stop=()) -> dict:
    """``{"tasks": {"multiple_choice": {...}, "generation": {...}}, "items": [...]}``."""
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    model.set_train(False)
    out, items = {}, []
    if tasks.choice:
        res = score_choices(model, tokenizer, tasks.choice)
        items += res.pop("items")
        out["multiple_choice"] = res
    if tasks.generation:
        res = exact_match(model, tokenizer, tasks.generation, max_new_tokens, stop)
        items += res.pop("items")
        out["generation"] = res
    return {"tasks": out, "items": items}


def table(results: dict) -> str:
    """The printed table: one row per (task, metric)."""
    rows = [("task", "items", "metric", "value")]
    for task, res in results["tasks"].items():
        for metric in ("acc", "acc_norm", "exact_match"):
            if metric in res:
                rows.append((task, str(res["n"]), metric, f"{res[metric]:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse(argv: list[str]):
    ap = argparse.ArgumentParser(prog="python training/evaluate.py --tasks FILE",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", required=True, help="JSON Lines file (see docs/evaluation.md)")
    ap.add_argument("--model", required=True, help="Hugging Face dir, checkpoint or run dir")
    ap.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's)")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    ns = ap.parse_args(argv)
    if ns.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens={ns.max_new_tokens}: must be >= 1")
    return ns


def main(argv: list[str]) -> int:
    from training.errors import exit_on_user_error

    with exit_on_user_error():
        ns = parse(argv)
        tasks = load_tasks(ns.tasks)
        from training.generate import load, resolve

        resolve(ns.model, ns.tokenizer)  # model and tokenizer exist: fail before any work
        if ns.adapter is not None:
            from models.peft import read_adapter_config

            read_adapter_config(ns.adapter)
        from mcore.distributed_env import set_device

        set_device("CPU")  # eager ops inline (mcore/distributed_env.py)
        model, tok = load(ns.model, ns.tokenizer)
        if ns.adapter is not None:
            from models.peft import load_adapter

            load_adapter(model, ns.adapter)
        results = run(tasks, model, tok, ns.max_new_tokens, ns.stop)
    results = {"source": ns.model, "adapter": ns.adapter, "file": ns.tasks, **results}
    print(table(results), flush=True)
    if ns.output:
        Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.output).write_text(json.dumps(results, indent=2))
    return 0
