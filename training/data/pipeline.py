"""``build_data(cfg)``: corpus -> tokenizer -> indexed dataset -> train/valid samples, cached.

With ``data.data_prefix`` and ``data.tokenizer`` set, both are used as they are. Otherwise the
missing pieces are built once into ``data.cache_dir/<key>/`` (``tokenizer.json``,
``text_document.bin/.idx``, ``corpus.json`` listing the files), where ``<key>`` hashes
everything they depend on (corpus files and sizes, vocabulary size, EOD setting, tokenizer file).
Rank 0 builds (each file written under a temporary name and renamed); other ranks wait for the
finished files, so no collective is needed.
Data that cannot train (no corpus, a tokenizer larger than the model's vocabulary, a token
stream too short for one global batch) raises ``training.errors.DataError`` naming the key.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from training.data.corpus import corpus_files
from training.data.indexed_dataset import MMapIndexedDataset, idx_path
from training.data.preprocess import preprocess
from training.data.sampler import EvalBatches, GPTBatchSampler, GPTSampleDataset, split_samples
from training.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe
from training.errors import DataError


@dataclass
class DataBundle:
    """What the training loop needs from the data side."""

    tokenizer: TextTokenizer
    dataset: MMapIndexedDataset
    train: GPTSampleDataset
    valid: GPTSampleDataset
    sampler: GPTBatchSampler        # this dp rank's training micro-batches; resumable
    eval_batches: EvalBatches | None  # None when data.valid_fraction == 0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for(path: Path, timeout: float) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for rank 0 to build '{path}'")
        time.sleep(0.2)


def prepare_dataset(cfg, rank: int = 0, timeout: float = 600.0, log=print) -> tuple[TextTokenizer, str]:
    """Make sure a tokenizer and a ``.bin/.idx`` exist; return ``(tokenizer, data_prefix)``."""
    from training.model_bridge import model_vocab

    d, vocab = cfg.data, model_vocab(cfg)  # model.vocab_size, or model.hf_path's vocabulary
    if d.data_prefix is not None:
        if d.tokenizer is None:
            raise DataError("data.data_prefix is set but data.tokenizer is not: give the "
                            "tokenizer.json the dataset was built with")
        return load_tokenizer(d.tokenizer), d.data_prefix
    files = corpus_files(d.corpus, d.corpus_max_bytes)
    key_src = {"files": [[str(f), f.stat().st_size] for f in files], "vocab": vocab,
               "eod": d.append_eod, "tokenizer": _sha(Path(d.tokenizer)) if d.tokenizer else None}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    tag = "stdlib" if d.corpus == "stdlib" else Path(d.corpus).stem
    root = Path(d.cache_dir) / f"{tag}_v{vocab}_{key}"
    tok_path = Path(d.tokenizer) if d.tokenizer else root / "tokenizer.json"
    prefix = str(root / "text_document")
    done = root / "corpus.json"
    if not done.exists():
        if rank != 0:
            _wait_for(done, timeout)
        else:
            root.mkdir(parents=True, exist_ok=True)
            if not tok_path.exists():
                log(f"data: training a byte-level BPE of {vocab} tokens on {len(files)} files "
                    f"-> {tok_path}")
                train_bpe(files, vocab, save_path=tok_path)
            tok = load_tokenizer(tok_path)
            log(f"data: tokenizing {len(files)} files -> {prefix}.bin/.idx")
            stats = preprocess(files, tok, prefix, append_eod=d.append_eod)
            tmp = done.with_name(done.name + ".tmp")
            tmp.write_text(json.dumps({**key_src, **stats}, indent=1))
            os.replace(tmp, done)
    return load_tokenizer(tok_path), prefix


def build_data(cfg, rank: int = 0, dp_rank: int = 0, consumed_samples: int = 0,
               timeout: float = 600.0, log=print) -> DataBundle:
    """Everything the loop reads: tokenizer, train/valid samples, this dp rank's sampler."""
    tok, prefix = prepare_dataset(cfg, rank, timeout, log)
    from training.model_bridge import model_vocab, vocab_key

    if tok.vocab_size > model_vocab(cfg):
        raise DataError(f"tokenizer has {tok.vocab_size} tokens but {vocab_key(cfg)} is "
                        f"{model_vocab(cfg)}")
    if not idx_path(prefix).exists():
        raise DataError(f"data.data_prefix: indexed dataset '{idx_path(prefix)}' does not exist")
    ds = MMapIndexedDataset(prefix)
    t, p = cfg.training, cfg.parallel
    train, valid = split_samples(ds.tokens, cfg.model.seq_length, cfg.data.valid_fraction)
    if len(train) < t.global_batch_size:
        source = cfg.data.data_prefix or cfg.data.corpus
        raise DataError(f"data.corpus='{source}' gives {len(train)} training samples of "
                        f"model.seq_length={cfg.model.seq_length} tokens ({len(ds.tokens):,} "
                        f"tokens), fewer than one global batch (training.global_batch_size="
                        f"{t.global_batch_size}): use more text or smaller batches")
    sampler = GPTBatchSampler(len(train), t.micro_batch_size, t.global_batch_size, dp_rank, p.dp,
                              seed=t.seed, consumed_samples=consumed_samples)
    evals = EvalBatches(len(valid), t.micro_batch_size, dp_rank, p.dp) if len(valid) else None
    return DataBundle(tok, ds, train, valid, sampler, evals)
