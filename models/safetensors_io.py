"""Read and write Hugging Face safetensors checkpoints as numpy arrays (bf16 included).

``read_checkpoint(dir)`` reads ``model.safetensors`` or the shards listed in
``model.safetensors.index.json`` (``weight_map``), and returns ``{name: LazyTensor}`` so only
the tensors a rank needs are read. bfloat16 is widened to float32 exactly (numpy has no bf16).
``write_checkpoint(dir, tensors, max_shard_bytes)`` writes one file or shards plus the index.
Reading checks what it can before any tensor is read: the header is JSON with a ``dtype``,
``shape`` and ``data_offsets`` per tensor, each tensor's byte range holds exactly
``prod(shape) * itemsize`` bytes inside the file, and every shard the index lists exists.
Each fault raises ``models.LoadError`` naming the file (and tensor).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import LoadError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _DTYPES.items()}, "BF16": 2}


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a safetensors file, read on ``load()``."""

    file: Path
    dtype: str
    shape: tuple
    start: int  # absolute byte offset in the file
    end: int

    def load(self) -> np.ndarray:
        with open(self.file, "rb") as f:
            f.seek(self.start)
            raw = f.read(self.end - self.start)
        if len(raw) != self.end - self.start:
            raise LoadError(f"{self.file}: truncated (tensor bytes {self.start}..{self.end})")
        if self.dtype == "BF16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        return np.frombuffer(raw, _DTYPES[self.dtype]).reshape(self.shape).copy()


def _entry(path: Path, name: str, info, data_start: int, size: int) -> LazyTensor:
    """One header entry checked against the file: known dtype, integer shape, a byte range inside
    the file whose length is ``prod(shape) * itemsize``."""
    where = f"{path}: tensor {name!r}"
    try:
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        start, end = (int(o) for o in info["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise LoadError(f"{where}: header entry {info!r} needs dtype, shape and data_offsets"
                        ) from None
    if dtype not in _ITEMSIZE:
        raise LoadError(f"{where}: unsupported dtype {dtype!r} (supported: {sorted(_ITEMSIZE)})")
    expected = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
    if not 0 <= start <= end or end - start != expected:
        raise LoadError(f"{where}: shape {list(shape)} of {dtype} needs {expected} bytes, the "
                        f"header gives data_offsets [{start}, {end}]")
    if data_start + end > size:
        raise LoadError(f"{where}: runs past the end of the file (truncated?)")
    return LazyTensor(Path(path), dtype, shape, data_start + start, data_start + end)


def read_header(path: Path) -> dict[str, LazyTensor]:
    """Tensors listed in one safetensors file's header (checked, see the module docstring)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LoadError(f"{path}: header length {n} exceeds file size {size} (not a "
                            "safetensors file, or truncated)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LoadError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: safetensors header is not a JSON object")
    return {name: _entry(Path(path), name, info, 8 + n, size)
            for name, info in header.items() if name != "__metadata__"}


def _index_files(index: Path) -> list[str]:
    """Shard file names listed by ``model.safetensors.index.json``'s ``weight_map``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{index}: not valid JSON ({exc})") from None
    except (KeyError, TypeError, AttributeError):
        raise LoadError(f"{index}: has no 'weight_map' object of tensor name -> file") from None


def read_checkpoint(directory) -> dict[str, LazyTensor]:
    """All tensors of a HF checkpoint directory (single file or sharded with an index)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = _index_files(index)
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{directory}: no *.safetensors files")
    tensors = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise LoadError(f"{path}: listed in {index.name} but missing")
        tensors.update(read_header(path))
    return tensors


def _write_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, a in arrays.items():
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` into the one safetensors file ``path`` (e.g. a PEFT adapter)."""
    _write_file(Path(path), tensors)


def write_checkpoint(directory, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None):
    """Write ``tensors`` as ``model.safetensors``, or as shards + index above ``max_shard_bytes``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(a.nbytes for a in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        _write_file(directory / "model.safetensors", tensors)
        return
    shards, current, size = [], {}, 0
    for name, a in tensors.items():
        if current and size + a.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = a
        size += a.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(directory / fname, shard)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
