"""Prompt in, text out, from a training checkpoint or a Hugging Face directory (one process).

    python training/generate.py runs/tiny_llama_demo/checkpoints/step_000150 --prompt "def "
    python training/generate.py runs/tiny_llama_demo          # newest checkpoint of that run
    python training/generate.py path/to/hf_dir --prompt "Hello" --tokenizer path/tokenizer.json

``SOURCE`` is a checkpoint step directory (``meta.json``), a run directory or checkpoint root
(its newest valid checkpoint), or a HF directory (``config.json`` + safetensors, read by
``models.from_pretrained``). Checkpoints saved with tp > 1 and / or pp > 1 are merged to one
process (under msrun with pp, ``training/pretrain.py`` itself samples through the stages).
The tokenizer: ``--tokenizer``, else the run's ``tokenizer.json`` (recorded in the checkpoint),
else ``tokenizer.json`` in the HF directory. Greedy unless ``--temperature`` > 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


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


def shard_ranks(parallel: dict, world_size: int) -> list[list[int]]:
    """Global ranks holding the model of data-parallel replica 0: per pipeline stage, its tp
    ranks in tp order (from the saved ``parallel`` section)."""
    from mcore.rank_layout import RankLayout

    layout = RankLayout(world=world_size, tp=int(parallel["tp"]), pp=int(parallel["pp"]),
                        order=parallel["order"])
    grid = layout.dense_grid()
    stages = [[0] * layout.tp for _ in range(layout.pp)]
    for rank in range(world_size):
        c = grid.coords(rank)
        if c["dp"] == 0 and c["cp"] == 0:
            stages[c["pp"]][c["tp"]] = rank
    return stages


def model_from_checkpoint(path: Path):
    """A one-process model with the weights of training checkpoint ``path`` (tp shards merged,
    pipeline stages joined: each stage holds its own layers under their global names);
    returns ``(model, meta)``."""
    import models
    from models.hf import load_weights
    from models.weights import split_dims, to_hf
    from training.checkpointing import load_checkpoint, read_meta
    from training.config import config_from_dict
    from training.model_bridge import hf_config
    from training.pretrain import _Array

    meta = read_meta(path)
    saved = meta["meta"]["config"]
    tp = int(saved["parallel"]["tp"])
    cfg = config_from_dict(saved, world_size=meta["world_size"])
    model = models.build_from_config(hf_config(cfg.model))
    split = {n: d for n, d in split_dims(model).items() if d is not None}
    full = {}
    for ranks in shard_ranks(saved["parallel"], meta["world_size"]):
        shards = [load_checkpoint(path, rank=r).model for r in ranks]
        for n in shards[0]:
            if n in full:  # a tied embedding's head copy on the last stage: same weight
                continue
            full[n] = (np.concatenate([s[n] for s in shards], split[n]) if n in split and tp > 1
                       else shards[0][n])
    table = model.hf.family.weight_table(model.config, model.hf.tie)
    hf = to_hf(table, full, split, tp)
    load_weights(model, {k: _Array(v) for k, v in hf.items()})
    return model, meta["meta"]


def load(source: str, tokenizer: str | None = None):
    """``(model, tokenizer)`` for ``source`` (see the module docstring)."""
    import models
    from training.data.tokenizer import load_tokenizer

    src = Path(source)
    ckpt = _checkpoint_dir(src) if src.is_dir() else None
    if ckpt is not None:
        model, meta = model_from_checkpoint(ckpt)
        tok_file = tokenizer or meta.get("tokenizer")
    elif (src / "config.json").is_file():
        model = models.from_pretrained(src)
        tok_file = tokenizer or src / "tokenizer.json"
    else:
        raise FileNotFoundError(f"'{source}' is neither a training checkpoint (meta.json), a run "
                                "directory with checkpoints, nor a Hugging Face directory (config.json)")
    if tok_file is None or not Path(tok_file).is_file():
        raise FileNotFoundError(f"tokenizer '{tok_file}' not found: pass --tokenizer FILE")
    return model, load_tokenizer(tok_file)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0) -> str:
    """The prompt followed by up to ``max_new_tokens`` generated tokens (stops at end-of-document).
    ``model``: a ``GPTModel``, or a ``PipelineModel`` of GPT stages (then every rank of the job
    calls this and gets the same text)."""
    import mindspore as ms

    import models
    from models.generate_pipeline import generate_pipeline

    ms.set_context(mode=ms.PYNATIVE_MODE)  # the KV-cache decoder runs eagerly
    ids = tokenizer.encode(prompt)
    run = generate_pipeline if hasattr(model, "chunk_models") else models.generate
    new = run(model, [ids], max_new_tokens, do_sample=temperature > 0,
              temperature=temperature or 1.0, top_p=top_p, seed=seed,
              stop_tokens=[tokenizer.eod_id])[0]
    return prompt + tokenizer.decode(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python training/generate.py", description=__doc__.split("\n")[0])
    ap.add_argument("source", help="checkpoint step dir, run dir, or Hugging Face dir")
    ap.add_argument("--prompt", default="def ", help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    ns = ap.parse_args(argv)
    import mindspore as ms

    ms.set_device("CPU")
    model, tok = load(ns.source, ns.tokenizer)
    print(generate_text(model, tok, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_p, ns.seed),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
