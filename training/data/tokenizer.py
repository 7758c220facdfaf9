"""Byte-level BPE tokenizer, trained and loaded with Hugging Face ``tokenizers``.

    tok = train_bpe(files, vocab_size=2048, save_path="data_cache/tokenizer.json")
    tok = load_tokenizer("data_cache/tokenizer.json")
    ids = tok.encode("def f(x):\\n    return x")      # list[int]
    tok.decode(ids)                                     # the same text back (byte-level: lossless)

Byte-level means every input byte has a token, so no text is ever unknown and decode(encode(s))
== s. The end-of-document token ``<|endoftext|>`` is id 0 and separates documents in the
indexed dataset. The saved file is a standard ``tokenizer.json`` that
``tokenizers.Tokenizer.from_file`` (and transformers' fast tokenizers) read.
"""
from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from training.errors import DataError

EOD_TOKEN = "<|endoftext|>"


class TextTokenizer:
    """A thin wrapper around ``tokenizers.Tokenizer`` with the few calls training needs."""

    def __init__(self, tokenizer: Tokenizer, eod_token: str = EOD_TOKEN):
        self.tokenizer = tokenizer
        eod = tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer has no end-of-document token {eod_token!r}")
        self.eod_id = eod

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)


MIN_BPE_VOCAB = 258  # the end-of-document token, 256 byte symbols and one merge


def train_bpe(files: list[str | os.PathLike], vocab_size: int,
              save_path: str | os.PathLike | None = None, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on text ``files``.

    The vocabulary holds the end-of-document token, the 256 byte symbols and the learned merges;
    a small corpus may stop short of ``vocab_size``. Deterministic for the same files.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE "
                         f"(needs >= {MIN_BPE_VOCAB})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    out = TextTokenizer(tok)
    if save_path is not None:
        out.save(save_path)
    return out


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load a ``tokenizer.json`` (ours, or any with an ``<|endoftext|>`` token); ``DataError``
    naming the file if it is missing, unreadable or lacks that token."""
    if not Path(path).is_file():
        raise DataError(f"tokenizer file '{path}' does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for bad files
        raise DataError(f"tokenizer file '{path}' cannot be read: {exc}") from None
    try:
        return TextTokenizer(tok)
    except ValueError as exc:
        raise DataError(f"tokenizer file '{path}': {exc}") from None
