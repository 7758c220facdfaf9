"""Megatron-compatible memory-mapped indexed dataset: ``PREFIX.bin`` (tokens) + ``PREFIX.idx``.

The files are byte-compatible with Megatron-LM's ``MMapIndexedDataset`` (``IndexedDataset`` in
megatron.core.datasets), so a dataset preprocessed here trains there and vice versa.

``PREFIX.bin``: every sequence's tokens, back to back, in the index's dtype, no header.

``PREFIX.idx`` (little-endian)::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version = 1
    uint8     dtype code (see DTYPE_CODES)
    uint64    N = number of sequences
    uint64    M = number of entries in document_indices
    int32[N]  sequence_lengths   tokens in each sequence
    int64[N]  sequence_pointers  byte offset of each sequence in PREFIX.bin
    int64[M]  document_indices   [0, end of doc 1, end of doc 2, ...] in sequence units

Here a document is one sequence (``add_document``) unless it is built from several with
``add_item`` + ``end_document``. Both files are written under temporary names and renamed when
``finalize`` runs, so a crash never leaves a half-written dataset under the final name.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A malformed or inconsistent ``.bin``/``.idx`` pair; the message names the file."""


def best_dtype(vocab_size: int) -> type:
    """The smallest token dtype Megatron uses for a vocabulary: uint16 below 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetBuilder:
    """Append token sequences, then ``finalize()`` to write ``PREFIX.idx`` and publish both files."""

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no Megatron dtype code")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = Path(f"{self.prefix}.bin.tmp{os.getpid()}")
        self._bin = open(self._tmp_bin, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self.num_tokens = 0

    def add_item(self, tokens) -> None:
        """Append one sequence (not yet closing its document)."""
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens) -> None:
        """Append one sequence that is a whole document."""
        self.add_item(tokens)
        self.end_document()

    def finalize(self) -> None:
        """Write the index, fsync both files, and rename them to their final names."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        docs = np.asarray(self.document_indices, dtype=np.int64)
        tmp_idx = Path(f"{self.prefix}.idx.tmp{os.getpid()}")
        with open(tmp_idx, "wb") as fh:
            fh.write(INDEX_MAGIC)
            fh.write(struct.pack("<Q", INDEX_VERSION))
            fh.write(struct.pack("<B", CODE_OF[self.dtype]))
            fh.write(struct.pack("<Q", len(lengths)))
            fh.write(struct.pack("<Q", len(docs)))
            fh.write(lengths.tobytes(order="C"))
            fh.write(pointers.tobytes(order="C"))
            fh.write(docs.tobytes(order="C"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        """Drop a partial build (temporary files only)."""
        if not self._bin.closed:
            self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)


class MMapIndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin`` / ``PREFIX.idx``.

    ``ds[i]`` is sequence ``i`` as a numpy array (a view into the mapped file); ``ds.tokens`` is
    the whole ``.bin`` as one flat array (all sequences concatenated, in order).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise IndexedDatasetError(f"indexed dataset file '{p}' does not exist")
        raw = np.memmap(ipath, dtype=np.uint8, mode="r")
        head = 9 + 8 + 1 + 8 + 8
        if len(raw) < head or bytes(raw[:9]) != INDEX_MAGIC:
            raise IndexedDatasetError(f"'{ipath}' is not a Megatron MMIDIDX index (bad magic)")
        version, code, n, m = struct.unpack("<QBQQ", bytes(raw[9:head]))
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"'{ipath}' has index version {version}, expected {INDEX_VERSION}")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"'{ipath}' has unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        need = head + 4 * n + 8 * n + 8 * m
        if len(raw) < need:
            raise IndexedDatasetError(
                f"'{ipath}' is truncated: {len(raw)} bytes, header promises {need}")
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=head)
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=head + 4 * n)
        self.doc_idx = np.frombuffer(raw, dtype=np.int64, count=m, offset=head + 12 * n)
        total = int(self.sizes.astype(np.int64).sum())
        nbytes = bpath.stat().st_size
        if nbytes != total * self.dtype.itemsize:
            raise IndexedDatasetError(
                f"'{bpath}' has {nbytes} bytes but '{ipath}' describes {total} tokens of "
                f"{self.dtype} ({total * self.dtype.itemsize} bytes)")
        self._idx_map = raw
        self.tokens = (np.memmap(bpath, dtype=self.dtype, mode="r") if total
                       else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences are contiguous in the .bin)."""
        first, last = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if first == last:
            return self.tokens[:0]
        start = int(self.pointers[first]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[first:last].astype(np.int64).sum())]
