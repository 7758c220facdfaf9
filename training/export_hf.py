"""Export a training checkpoint of any parallel layout as a Hugging Face directory (one process).

    python -m training.export_hf runs/tiny_llama_demo/checkpoints/step_000150 hf_out/
    python -m training.export_hf runs/tiny_llama_demo hf_out/     # newest valid checkpoint

``SOURCE``: a checkpoint step directory, a run directory or a checkpoint root (its newest
valid checkpoint). The checkpoint is read as whole tensors through ``mcore.checkpoint`` (tp,
pp, dp, ep / etp shards and distributed-optimizer runs alike), then written with
``models.save_pretrained`` (float32 safetensors + config.json, loadable by transformers), plus
the run's ``tokenizer.json`` when the checkpoint records one. Starting a run from such a
directory (or any HF directory) is ``model.hf_path=DIR`` (``training/pretrain.py``).
Bad input prints ``<kind> error: <one line naming the path>`` and exits 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import LoadError  # noqa: E402
from training.errors import exit_on_user_error  # noqa: E402


def export(source: str | Path, out_dir: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write checkpoint ``source`` (or the newest under it) to ``out_dir``; return the checkpoint."""
    from training.generate import _checkpoint_dir, model_from_checkpoint

    ckpt = _checkpoint_dir(Path(source)) if Path(source).is_dir() else None
    if ckpt is None:
        raise LoadError(f"'{source}' is neither a training checkpoint (meta.json) nor a run "
                        "directory with checkpoints")
    model, meta = model_from_checkpoint(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_bytes)
    tok = meta.get("tokenizer")
    if tok and Path(tok).is_file():
        shutil.copyfile(tok, out / "tokenizer.json")
    return ckpt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.export_hf", description=__doc__.split("\n")[0])
    ap.add_argument("source", help="checkpoint step dir, run dir or checkpoint root")
    ap.add_argument("out_dir", help="Hugging Face directory to write")
    ap.add_argument("--max-shard-bytes", type=int, default=None, help="split into several files")
    ns = ap.parse_args(argv)
    with exit_on_user_error():
        ckpt = export(ns.source, ns.out_dir, ns.max_shard_bytes)
    print(f"exported '{ckpt}' to '{ns.out_dir}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
