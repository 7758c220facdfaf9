"""Tokenize text files into a Megatron-compatible indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

    python -m training.data.preprocess --input stdlib --train-tokenizer 2048 \\
        --tokenizer data_cache/tokenizer.json --output-prefix data_cache/stdlib_text_document
    python -m training.data.preprocess --input my_texts/ --tokenizer tokenizer.json \\
        --output-prefix data/my_texts

``--input`` is ``stdlib`` (the bundled corpus), files, or directories (every file, sorted). One
file is one document, ended by the end-of-document token unless ``--no-eod``. With
``--train-tokenizer V`` a byte-level BPE of V tokens is first trained on the same files and
saved to ``--tokenizer``. A progress line shows documents, tokens and throughput.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.data.corpus import corpus_files, read_document
from training.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from training.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe


def preprocess(files: list[Path], tokenizer: TextTokenizer, output_prefix: str,
               append_eod: bool = True, batch_docs: int = 32, progress=None) -> dict:
    """Tokenize ``files`` into ``output_prefix``.bin/.idx; return counts (docs, tokens, bytes, seconds).

    ``progress(line)`` receives a status line every batch (``None``: silent).
    """
    builder = IndexedDatasetBuilder(output_prefix, best_dtype(tokenizer.vocab_size))
    t0, n_bytes, n_docs = time.perf_counter(), 0, 0
    try:
        for start in range(0, len(files), batch_docs):
            texts = [read_document(f) for f in files[start:start + batch_docs]]
            for ids in tokenizer.encode_batch(texts):
                builder.add_document(ids + [tokenizer.eod_id] if append_eod else ids)
            n_docs += len(texts)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            if progress is not None:
                dt = max(time.perf_counter() - t0, 1e-9)
                progress(f"preprocess: {n_docs}/{len(files)} docs | {builder.num_tokens:,} tokens | "
                         f"{n_bytes / dt / 1e6:.2f} MB/s")
        builder.finalize()
    except BaseException:
        builder.abort()
        raise
    return {"documents": n_docs, "tokens": builder.num_tokens, "bytes": n_bytes,
            "seconds": time.perf_counter() - t0}


def _expand(inputs: list[str], max_bytes: int) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        files.extend(corpus_files(item, max_bytes))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.data.preprocess",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="'stdlib', text files or directories")
    ap.add_argument("--tokenizer", required=True,
                    help="tokenizer.json to load (or to write with --train-tokenizer)")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                    help="first train a byte-level BPE of VOCAB tokens")
    ap.add_argument("--max-bytes", type=int, default=4_000_000, help="size cap of the 'stdlib' corpus")
    ap.add_argument("--no-eod", action="store_true", help="do not end documents with <|endoftext|>")
    args = ap.parse_args(argv)
    try:
        files = _expand(args.input, args.max_bytes)
        if args.train_tokenizer:
            print(f"training a byte-level BPE of {args.train_tokenizer} tokens on {len(files)} "
                  "files ...", flush=True)
            tok = train_bpe(files, args.train_tokenizer, save_path=args.tokenizer)
        else:
            tok = load_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def show(line: str) -> None:
        print("\r" + line, end="", flush=True)

    stats = preprocess(files, tok, args.output_prefix, append_eod=not args.no_eod, progress=show)
    print(f"\nwrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, "
          f"{stats['tokens']:,} tokens (vocab {tok.vocab_size}) in {stats['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
