"""Prompts in, text out, from a training checkpoint or a Hugging Face directory (one process).

    python training/generate.py runs/tiny_llama_demo/checkpoints/step_000150 --prompt "def "
    python training/generate.py runs/tiny_llama_demo          # newest checkpoint of that run
    python training/generate.py path/to/hf_dir --prompt "Hello" --tokenizer path/tokenizer.json
    python training/generate.py runs/tiny_llama_demo --prompt "def " --prompt "class " \
        --temperature 0.8 --top-k 40 --stop "\n\n"      # two prompts in one batch
    python training/generate.py runs/tiny_llama_demo --prompt-file prompts.txt   # one per line

``SOURCE`` is a checkpoint step directory (``meta.json``), a run directory or checkpoint root
(its newest valid checkpoint), or a HF directory (``config.json`` + safetensors, read by
``models.from_pretrained``). A checkpoint of any parallel layout (tp, pp, MoE ep / etp) reads
into one process through ``mcore.checkpoint`` (under msrun with pp, ``training/pretrain.py``
itself samples through the stages).
A checkpoint written with sequence parallelism reads like any other (same names and shapes);
``sampling_model`` gives a running sequence-parallel job a twin it can decode with.
The tokenizer: ``--tokenizer``, else the run's ``tokenizer.json`` (recorded in the checkpoint),
else ``tokenizer.json`` in the HF directory; it must fit the model's vocabulary.

All prompts (every ``--prompt``, then each non-empty line of ``--prompt-file``) are generated
as one batch (``models.generate``: ragged prompts are left-padded, each row gives what it
gives alone). Greedy unless ``--temperature`` > 0 (then top-k, top-p sampling, seeded).
Generation of a row ends at end-of-document or ``--max-new-tokens``; its text is then cut
before the first ``--stop`` string in the generated part. stdout: the texts (several are
separated by a line of 40 ``-``); stderr: ``N new tokens in T s (R tokens/s)``. Decoding is
compiled (``models.generate`` defaults: static KV cache, graphs per size bucket); ``--eager``
runs it in PyNative (same tokens, slower; for debugging).
Bad input (source, tokenizer missing or larger than the model's vocabulary) prints
``<kind> error: <one line naming the file>`` and exits 2 before the model is built.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.errors import DataError, exit_on_user_error

SEPARATOR = "-" * 40


def _checkpoint_dir(source: Path) -> Path | None:
    """``source`` itself if it is a checkpoint, else the newest valid one under it (or None)."""
    from training.checkpointing import find_latest_valid

    if (source / "meta.json").is_file():
        return source
    for root in (source, source / "checkpoints"):
        found = find_latest_valid(root) if root.is_dir() else None
        if found is not None:
            return found
    return None


def model_from_checkpoint(path: Path):
    """A one-process model with the weights of training checkpoint ``path``, whatever parallel
    layout wrote it (``mcore.checkpoint`` stores global tensors: tp shards, pipeline stages and
    ep / etp expert shards read back as the whole model; multi-token-prediction depths left
    out); returns ``(model, meta)``."""
    import mindspore as ms

    from mcore.checkpoint import ShardSpec, load_tensors
    from training.checkpointing import read_meta
    from training.config import config_from_dict
    from training.model_bridge import build_gpt

    meta = read_meta(path)
    saved = meta["meta"]["config"]
    cfg = config_from_dict(saved, world_size=meta["world_size"])
    cfg.model.mtp.num_layers = 0  # multi-token prediction depths only serve training
    if cfg.lora.enabled:  # adapters only in the checkpoint: frozen weights as training built them
        from training.lora import model_from_checkpoint as lora_model

        return lora_model(path, cfg, meta["world_size"]), meta["meta"]
    model = build_gpt(cfg)  # the saved YAML's TransformerConfig, as training built it
    # Training saves what it trains and the buffers it updates; a parameter that is neither
    # (a router's expert_bias with model.moe.expert_bias off) keeps its initial value. A
    # missing trained parameter stays an error (load_tensors names it).
    params = {n: p for n, p in model.parameters_and_names()
              if p.requires_grad or n in meta["tensors"]}
    weights = load_tensors(path, {n: ShardSpec.whole(p.shape) for n, p in params.items()}, meta)
    for name, param in params.items():
        param.set_data(ms.Tensor(weights[name], param.dtype))
    return model, meta["meta"]


@dataclass
class Source:
    """What ``SOURCE`` is, found without building the model: a training ``checkpoint`` (step dir)
    or an ``hf`` directory, its tokenizer file and the model's vocabulary size."""

    kind: str
    path: Path
    tokenizer: Path
    vocab_size: int
    meta: dict | None = None


def resolve(source: str, tokenizer: str | None = None) -> Source:
    """``Source`` of ``source``: ``LoadError`` if it is no checkpoint / HF directory, ``DataError``
    if the tokenizer file does not exist."""
    from models.errors import LoadError
    from models.hf import read_config, vocab_size_of
    from training.checkpointing import read_meta

    src = Path(source)
    ckpt = _checkpoint_dir(src) if src.is_dir() else None
    if ckpt is not None:
        meta = read_meta(ckpt)["meta"]
        model = meta["config"]["model"]
        vocab = int(model["vocab_size"])  # a run from model.hf_path: that directory's vocabulary
        if model.get("hf_path") and (Path(model["hf_path"]) / "config.json").is_file():
            vocab = int(vocab_size_of(read_config(Path(model["hf_path"]))))
        found = Source("checkpoint", ckpt, tokenizer or meta.get("tokenizer"), vocab, meta)
        where = f"the checkpoint's recorded tokenizer ({ckpt / 'meta.json'})"
    elif (src / "config.json").is_file():
        hf = read_config(src)
        try:
            vocab = int(vocab_size_of(hf))  # a family's own key: ChatGLM's padded_vocab_size
        except KeyError as exc:
            raise LoadError(f"{src / 'config.json'}: missing required key {exc}") from None
        except ValueError as exc:  # a model_type no family holds
            raise LoadError(f"{src / 'config.json'}: {exc}") from None
        found = Source("hf", src, tokenizer or src / "tokenizer.json", vocab)
        where = f"'{src / 'tokenizer.json'}'"
    else:
        raise LoadError(f"'{source}' is neither a training checkpoint (meta.json), a run "
                        "directory with checkpoints, nor a Hugging Face directory (config.json)")
    if tokenizer is not None:
        where = "--tokenizer"
    if found.tokenizer is None or not Path(found.tokenizer).is_file():
        raise DataError(f"tokenizer '{found.tokenizer}' ({where}) not found: pass --tokenizer FILE")
    found.tokenizer = Path(found.tokenizer)
    return found


def load(source: str, tokenizer: str | None = None):
    """``(model, tokenizer)`` for ``source`` (see the module docstring). The tokenizer is checked
    (exists, fits the model's vocabulary) before the model is built."""
    import models
    from training.data.tokenizer import load_tokenizer

    src = resolve(source, tokenizer)
    tok = load_tokenizer(src.tokenizer)
    if tok.vocab_size > src.vocab_size:
        raise DataError(f"tokenizer '{src.tokenizer}' has {tok.vocab_size} tokens but the model's "
                        f"vocabulary has {src.vocab_size} ({src.path}): pass the tokenizer the "
                        "model was trained with")
    if src.kind == "checkpoint":
        model, _ = model_from_checkpoint(src.path)
    else:
        model = models.from_pretrained(src.path)
    return model, tok


def sampling_model(cfg, model, dims):
    """``model``, or with sequence or context parallelism (KV-cache decoding feeds one token at a
    time, which cannot be split over tp or cp) a twin built without them holding the same
    weights: parameter names and shapes depend on neither ``parallel.sp`` nor ``parallel.cp``
    (every cp rank of the job decodes the same text)."""
    import copy

    from mindspore import ops

    from training.pretrain import build_model

    if not (cfg.parallel.sp and dims.tp.size > 1) and dims.cp.size == 1:
        return model
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.parallel.sp = False
    plain_cfg.parallel.cp = 1  # context parallelism splits whole sequences, not decode steps
    plain = build_model(plain_cfg, dims, read_hf=False)
    pairs = (zip(model.chunk_models, plain.chunk_models) if hasattr(model, "chunk_models")
             else [(model, plain)])
    for trained, twin in pairs:
        weights = dict(trained.parameters_and_names())
        for name, param in twin.parameters_and_names():
            ops.assign(param, weights[name])
    return plain


def cut_at_stop(text: str, stop) -> str:
    """``text`` up to (not including) the earliest occurrence of any ``stop`` string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(ends)] if ends else text


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   stop=(), compiled: bool = True) -> tuple[list[str], int]:
    """``(texts, new_tokens)``: each prompt followed by its generated text (ended by end-of-
    document or ``max_new_tokens``, then cut before the first ``stop`` string), and the number
    of tokens generated over the batch. ``model``: a ``GPTModel`` (compiled decoding unless
    ``compiled=False``), or a ``PipelineModel`` of GPT stages (PyNative; then every rank of the
    job calls this and gets the same texts)."""
    import mindspore as ms

    import models
    from models.generate_pipeline import generate_pipeline

    ms.set_context(mode=ms.PYNATIVE_MODE)  # host-side loop; the decode steps are jitted
    ids = tokenizer.encode_batch(list(prompts))
    opts = dict(do_sample=temperature > 0, temperature=temperature or 1.0, top_k=top_k,
                top_p=top_p, seed=seed, stop_tokens=[tokenizer.eod_id])
    if hasattr(model, "chunk_models"):
        new = generate_pipeline(model, ids, max_new_tokens, **opts)
    else:
        new = models.generate(model, ids, max_new_tokens, compiled=compiled, **opts)
    texts = [p + cut_at_stop(tokenizer.decode(n), stop) for p, n in zip(prompts, new)]
    return texts, sum(len(n) for n in new)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, top_k: int = 0, stop=(),
                  compiled: bool = True) -> str:
    """``generate_texts`` for one prompt: the prompt followed by its generated text."""
    texts, _ = generate_texts(model, tokenizer, [prompt], max_new_tokens, temperature, top_k,
                              top_p, seed, stop, compiled)
    return texts[0]


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """``--prompt`` values, then the non-empty lines of ``--prompt-file``; ``["def "]`` if none."""
    out = list(prompts or [])
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise DataError(f"--prompt-file '{prompt_file}': no such file")
        out += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out or ["def "]


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="python training/generate.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("source", help="checkpoint step dir, run dir, or Hugging Face dir")
    ap.add_argument("--prompt", action="append", help="text to continue (repeat for a batch; "
                    "default 'def ')")
    ap.add_argument("--prompt-file", default=None, help="more prompts, one per non-empty line")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--stop", action="append", default=[], help="cut the text before this string "
                    "(repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    ap.add_argument("--eager", action="store_true", help="decode in PyNative instead of compiled "
                    "graphs (same tokens; debugging)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    with exit_on_user_error():
        prompts = read_prompts(ns.prompt, ns.prompt_file)
        resolve(ns.source, ns.tokenizer)  # source and tokenizer exist: fail before any work
        from mcore.distributed_env import set_device

        set_device("CPU")  # eager ops inline (mcore/distributed_env.py)
        model, tok = load(ns.source, ns.tokenizer)
        t0 = time.perf_counter()
        texts, n = generate_texts(model, tok, prompts, ns.max_new_tokens, ns.temperature,
                                  ns.top_k, ns.top_p, ns.seed, ns.stop, compiled=not ns.eager)
        seconds = time.perf_counter() - t0
    print(f"\n{SEPARATOR}\n".join(texts), flush=True)
    print(f"{n} new tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s)",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
