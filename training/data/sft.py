"""``build_sft_data(cfg)``: chat JSON Lines -> masked token samples -> (packed) rows, cached.

Samples. Each conversation (``training.data.chat``) is rendered with the chat template and
tokenised into ``ids`` and an assistant ``mask``; a sample longer than ``model.seq_length + 1``
tokens is cut there. Its next-token pairs are ``inputs = ids[:-1]``, ``labels = ids[1:]`` with
``labels = -100`` where ``mask[1:] == 0`` (the loss counts assistant tokens only). A sample left
with no assistant label (cut away) is dropped, and the count is logged.

Rows (``SFTRows``; what the sampler indexes): with ``sft.pack`` (default) consecutive samples
are packed next-fit into rows of ``model.seq_length`` positions, else one sample per row.
``batch(indices)`` -> ``(inputs, labels, position_ids, segment_ids)``, int32 ``[b, s]``:
positions restart at 0 for every sample, ``segment_ids`` number the samples of a row 1, 2, ...
and are 0 on padding (inputs = end-of-sequence id, labels = -100). The model takes the segment
ids as its ``key_mask`` (``mcore.fusions.attention``: no attention across samples).

Cache. The tokenised samples are built once into ``data.cache_dir/sft_<stem>_<key>/samples.npz``
(``<key>`` hashes the JSONL, the tokenizer file, the template and ``model.seq_length``); rank 0
builds (temporary name, then rename), other ranks wait, as ``training.data.pipeline`` does.
Without ``data.tokenizer`` (and no ``tokenizer.json`` in ``model.hf_path``) a byte-level BPE of
``model.vocab_size`` tokens is trained on the rendered conversations into the same directory.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.chat import encode_turns, load_template, read_conversations, render_turns
from training.data.pipeline import _wait_for
from training.data.sampler import EvalBatches, GPTBatchSampler
from training.data.tokenizer import EOD_TOKEN, TextTokenizer, load_tokenizer, train_bpe
from training.errors import DataError

IGNORE = -100


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class SFTRows:
    """Rows of whole samples (see the module docstring); ``rows[k]`` lists sample indices."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, mask: np.ndarray,
                 rows: list[list[int]], seq_length: int, pad_id: int):
        self.tokens, self.offsets, self.mask = tokens, offsets, mask
        self.rows, self.seq_length, self.pad_id = rows, int(seq_length), int(pad_id)

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i``'s ``(inputs, labels)`` (labels -100 off the assistant tokens)."""
        ids = self.tokens[self.offsets[i]:self.offsets[i + 1]].astype(np.int32)
        keep = self.mask[self.offsets[i] + 1:self.offsets[i + 1]].astype(bool)
        return ids[:-1], np.where(keep, ids[1:], IGNORE).astype(np.int32)

    def batch(self, indices) -> tuple[np.ndarray, ...]:
        """``(inputs, labels, position_ids, segment_ids)``, int32 ``[len(indices), seq_length]``."""
        b, s = len(indices), self.seq_length
        out = [np.full((b, s), self.pad_id, np.int32), np.full((b, s), IGNORE, np.int32),
               np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)]
        for r, row in enumerate(indices):
            pos = 0
            for seg, i in enumerate(self.rows[int(row)], 1):
                inputs, labels = self.sample(i)
                n = len(inputs)
                out[0][r, pos:pos + n], out[1][r, pos:pos + n] = inputs, labels
                out[2][r, pos:pos + n], out[3][r, pos:pos + n] = np.arange(n), seg
                pos += n
        return tuple(out)


def pack_rows(lengths: list[int], seq_length: int, pack: bool) -> list[list[int]]:
    """Sample indices per row: next-fit packing of ``lengths`` (input positions per sample) into
    rows of ``seq_length``, or one sample per row without ``pack``."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    rows, used = [], seq_length
    for i, n in enumerate(lengths):
        if used + n > seq_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


@dataclass
class SFTData:
    """What the training loop reads (the fields of ``training.data.pipeline.DataBundle``)."""

    tokenizer: TextTokenizer
    train: SFTRows
    valid: SFTRows
    sampler: GPTBatchSampler
    eval_batches: EvalBatches | None
    template: object  # training.data.chat.ChatTemplate
    dropped: int  # samples without an assistant label after the cut


def sft_tokenizer_source(cfg) -> Path | None:
    """The tokenizer.json the run uses: ``data.tokenizer``, else ``model.hf_path``'s, else None
    (a BPE is trained on the data)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.model.hf_path and (Path(cfg.model.hf_path) / "tokenizer.json").is_file():
        return Path(cfg.model.hf_path) / "tokenizer.json"
    return None


def eos_token(cfg) -> str:
    """The end-of-sequence token string of the run's template directory (``eos_token_of``)."""
    return eos_token_of(template_dir(cfg))


def eos_token_of(directory) -> str:
    """The end-of-sequence token string: ``directory``'s ``tokenizer_config.json`` ``eos_token``,
    else ours (``EOD_TOKEN``)."""
    conf = Path(directory) / "tokenizer_config.json" if directory else None
    if conf is not None and conf.is_file():
        from training.data.chat import _token_str

        try:
            eos = _token_str(json.loads(conf.read_text(encoding="utf-8")).get("eos_token"))
        except (OSError, ValueError) as exc:
            raise DataError(f"'{conf}' cannot be read: {exc}") from None
        if eos:
            return eos
    return EOD_TOKEN


def template_dir(cfg) -> str | None:
    return cfg.sft.template_dir or cfg.model.hf_path


def model_vocab(cfg) -> int:
    """The model's vocabulary: ``training.model_bridge.model_vocab`` (``model.hf_path``'s
    config.json through the family's ``vocab_size_of``, else ``model.vocab_size``)."""
    from training.model_bridge import model_vocab as vocab

    return vocab(cfg)


def load_sft_tokenizer(path: Path, eos: str) -> TextTokenizer:
    """``path`` (a tokenizer.json) with ``eos`` as its end-of-sequence token (``DataError``)."""
    if eos == EOD_TOKEN:
        return load_tokenizer(path)
    from tokenizers import Tokenizer

    try:
        return TextTokenizer(Tokenizer.from_file(str(path)), eod_token=eos)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions
        raise DataError(f"tokenizer file '{path}': {exc}") from None


def prepare_samples(cfg, rank: int = 0, timeout: float = 600.0, log=print):
    """Build (rank 0) or wait for the cached samples; ``(tokenizer, template, npz path)``."""
    src = Path(cfg.sft.data)
    eos = eos_token(cfg)
    template = load_template(template_dir(cfg), eos)
    tok_src = sft_tokenizer_source(cfg)
    key_src = {"data": _sha(src) if src.is_file() else str(src), "seq": cfg.model.seq_length,
               "template": template.source, "special": template.special,
               "tokenizer": _sha(tok_src) if tok_src else f"bpe{model_vocab(cfg)}"}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cfg.data.cache_dir) / f"sft_{src.stem}_{key}"
    tok_path, done = tok_src or root / "tokenizer.json", root / "samples.npz"
    if not done.exists() and rank != 0:
        _wait_for(done, timeout)
    elif not done.exists():
        convs = read_conversations(src)  # DataError naming file:line
        pieces = [render_turns(template, c) for c in convs]
        root.mkdir(parents=True, exist_ok=True)
        if not tok_path.exists():
            text = root / "rendered.txt"
            text.write_text("\n".join("".join(t for t, _ in p) for p in pieces), encoding="utf-8")
            log(f"data: training a byte-level BPE of {model_vocab(cfg)} tokens on "
                f"{len(convs)} conversations -> {tok_path}")
            train_bpe([text], model_vocab(cfg), save_path=tok_path)
        tok = load_sft_tokenizer(tok_path, eos)
        log(f"data: tokenizing {len(convs)} conversations of '{src}' -> {done}")
        ids, masks, offsets = [], [], [0]
        for p in pieces:
            t, m = encode_turns(tok, p)
            t, m = t[:cfg.model.seq_length + 1], m[:cfg.model.seq_length + 1]
            ids += t
            masks += m
            offsets.append(len(ids))
        tmp = root / f"samples.tmp{os.getpid()}.npz"
        np.savez(tmp, tokens=np.asarray(ids, np.int64), mask=np.asarray(masks, np.int8),
                 offsets=np.asarray(offsets, np.int64))
        os.replace(tmp, done)
    return load_sft_tokenizer(tok_path, eos), template, done


def build_sft_data(cfg, rank: int = 0, dp_rank: int = 0, timeout: float = 600.0,
                   log=print) -> SFTData:
    """Everything the loop reads for fine-tuning (see the module docstring)."""
    tok, template, path = prepare_samples(cfg, rank, timeout, log)
    log(f"data: chat template: {template.origin}")
    if tok.vocab_size > model_vocab(cfg):
        raise DataError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                        f"{model_vocab(cfg)} (model.vocab_size or model.hf_path)")
    z = np.load(path)
    tokens, mask, offsets = z["tokens"], z["mask"], z["offsets"]
    keep = [i for i in range(len(offsets) - 1)
            if offsets[i + 1] - offsets[i] >= 2 and mask[offsets[i] + 1:offsets[i + 1]].any()]
    dropped = len(offsets) - 1 - len(keep)
    if dropped:
        log(f"data: {dropped} sample(s) dropped: no assistant token within model.seq_length="
            f"{cfg.model.seq_length}")
    starts, ends = offsets[keep], offsets[np.asarray(keep, np.int64) + 1]
    offsets = np.concatenate([[0], np.cumsum(ends - starts)])
    tokens = np.concatenate([tokens[a:b] for a, b in zip(starts, ends)]) if keep else tokens[:0]
    mask = np.concatenate([mask[a:b] for a, b in zip(starts, ends)]) if keep else mask[:0]
    s, t, p = cfg.model.seq_length, cfg.training, cfg.parallel
    rows = pack_rows([int(n) - 1 for n in np.diff(offsets)], s, cfg.sft.pack)
    n_valid = int(round(len(rows) * cfg.data.valid_fraction))
    n_valid = max(n_valid, 1) if cfg.data.valid_fraction > 0 else 0
    train_rows, valid_rows = rows[:len(rows) - n_valid], rows[len(rows) - n_valid:]
    if len(train_rows) < t.global_batch_size:
        raise DataError(f"sft.data='{cfg.sft.data}' gives {len(train_rows)} training rows of "
                        f"model.seq_length={s} (sft.pack={cfg.sft.pack}), fewer than one global "
                        f"batch (training.global_batch_size={t.global_batch_size})")
    make = lambda r: SFTRows(tokens, offsets, mask, r, s, tok.eod_id)  # noqa: E731
    sampler = GPTBatchSampler(len(train_rows), t.micro_batch_size, t.global_batch_size, dp_rank,
                              p.dp, seed=t.seed)
    evals = EvalBatches(len(valid_rows), t.micro_batch_size, dp_rank, p.dp) if valid_rows else None
    return SFTData(tok, make(train_rows), make(valid_rows), sampler, evals, template, dropped)
