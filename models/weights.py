"""Weight-name tables: how each parameter of a ``GPTModel`` is made of Hugging Face tensors.

A table maps a model parameter name (``decoder.layers.0.self_attention.linear_qkv.weight``) to
a tuple of ``Piece``s concatenated along dim 0 (fused q/k/v, gate/up). A ``Piece`` is a HF
tensor, or a strided part of one: its rows viewed as ``[groups, count, slot]``, keeping the
``span`` slots from ``index`` of each group (``count=2, index=1`` = second half; ``groups=n_kv,
count=2`` = every other head of an interleaved k/v tensor; ``groups=n_kv, count=qg + 2,
index=0, span=qg`` = the queries of InternLM2's ``wqkv``, whose groups hold ``qg`` query heads,
then a key and a value head). ``rows`` is the piece's row count at tp=1.
Two switches cover layouts older checkpoints use: ``transposed`` (the HF tensor is stored
``[in, out]``, GPT-2's ``Conv1D``: it is transposed before anything else) and ``offset`` (the
piece is the contiguous rows ``[offset, offset + rows)`` of the tensor: a fused ``[q; k; v]``
whose parts differ in size and feed different parameters, GPTBigCode's multi-query ``c_attn``).

Mixture-of-experts layers store their experts stacked (``GroupedMLP``: ``fc1 [El, h, 2f]``,
``fc2 [El, f, h]``) while HF checkpoints hold one Linear weight ``[out, in]`` per expert. An
``ExpertStack`` entry lists, per GLOBAL expert, the pieces of that expert's ``[out, in]``
matrix (gate and up for fc1, down for fc2); the parameter is their transposes stacked in
expert order. An empty entry ``()`` (``NOT_STORED``) marks a parameter HF checkpoints do not
hold (e.g. the unused expert bias of a router): it keeps its initial value and is not written.

``to_local`` builds this rank's parameter values (each piece is sharded separately along the
parameter's tp split dim, then concatenated: the layout ``mcore`` layers expect; an
``ExpertStack`` reads only the experts of its expert-parallel rank, and splits each piece over
the expert tensor-parallel group etp along the stack's split dim: fc1's gate and up rows
separately, fc2's columns); ``to_hf`` splits full (tp=1, etp=1, all experts) parameter values
back into HF tensors.
Errors name the HF tensor or parameter at fault; a checkpoint that lacks a tensor, or holds
NaN / Inf in one, raises ``models.LoadError`` naming the tensor and its file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcore.tensor_parallel.sharding import shard
from models.errors import LoadError


@dataclass(frozen=True)
class Piece:
    name: str
    rows: int | None = None
    groups: int = 1
    count: int = 1
    index: int = 0
    transposed: bool = False
    offset: int | None = None
    span: int = 1

    def take(self, full: np.ndarray) -> np.ndarray:
        """This piece of the HF tensor ``full``."""
        if self.transposed:
            full = full.T  # [in, out] -> [out, in]
        if self.offset is not None:
            full = full[self.offset:self.offset + self.rows]
            if full.shape[0] != self.rows:
                raise ValueError(f"{self.name}: rows [{self.offset}, {self.offset + self.rows}) "
                                 f"lie outside its {full.shape[0] + self.offset} rows")
        if self.count == 1 and self.groups == 1:
            return full
        per = full.shape[0] // (self.groups * self.count)
        if per * self.groups * self.count != full.shape[0]:
            raise ValueError(f"{self.name}: {full.shape[0]} rows do not split into "
                             f"{self.groups} x {self.count}")
        view = full.reshape((self.groups, self.count, per) + full.shape[1:])
        kept = view[:, self.index:self.index + self.span]  # [groups, span, per, ...]
        return kept.reshape((self.groups * self.span * per,) + full.shape[1:])


def pieces(*names: str) -> tuple[Piece, ...]:
    """Plain one-to-one (or simply concatenated) HF tensors."""
    return tuple(Piece(n) for n in names)


NOT_STORED: tuple = ()


@dataclass(frozen=True)
class ExpertStack:
    """A stacked expert parameter ``[E, in, out]``: ``experts[e]`` are the pieces (rows
    concatenated) of global expert ``e``'s HF matrix ``[out, in]``. Iterating yields every
    piece of every expert (the HF tensor names the full parameter uses)."""

    experts: tuple[tuple[Piece, ...], ...]

    def __iter__(self):
        for plist in self.experts:
            yield from plist

    def local(self, hf: dict, shape: tuple, ep_rank: int, pname: str, dim: int | None = None,
              etp: int = 1, etp_rank: int = 0) -> np.ndarray:
        """This expert-parallel rank's block ``[El, in, out]`` (``El = shape[0]``): experts
        ``[ep_rank El, (ep_rank + 1) El)``, and only their tensors are read. With ``etp`` > 1,
        etp rank ``etp_rank``'s slice of each piece along the stack's split ``dim`` (2: out,
        the HF rows; 1: in, the HF columns)."""
        n_local, total = shape[0], len(self.experts)
        if total % n_local or not 0 <= ep_rank < total // n_local:
            raise ValueError(f"parameter {pname}: {n_local} local experts of {total} do not fit "
                             f"expert-parallel rank {ep_rank}")
        blocks = []
        for e in range(ep_rank * n_local, (ep_rank + 1) * n_local):
            parts = []
            for piece in self.experts[e]:
                if piece.name not in hf:
                    raise LoadError(f"checkpoint is missing tensor {piece.name!r} (for {pname})")
                part = piece.take(_finite(piece.name, hf[piece.name]))  # [out, in]
                if etp > 1 and dim is not None:
                    part = shard(part, etp, etp_rank, 0 if dim == 2 else 1)
                parts.append(part)
            blocks.append(np.concatenate(parts, 0).T)  # [out, in] -> [in, out]
        value = np.stack(blocks)  # El x [in, out] -> [El, in, out]
        if tuple(value.shape) != tuple(shape):
            names = ", ".join(p.name for p in self.experts[ep_rank * n_local])
            raise ValueError(f"shape mismatch for expert tensors {names}: checkpoint gives "
                             f"{value.shape[1:]} per expert, parameter {pname} is "
                             f"{tuple(shape)}")
        return value


def split_dims(model) -> dict[str, int | None]:
    """Parameter name -> tp split dim (None = replicated), from each Cell's ``shard_dims``."""
    dims = {}
    for cell_name, cell in model.cells_and_names():
        for pname, dim in getattr(cell, "shard_dims", {}).items():
            dims[f"{cell_name}.{pname}" if cell_name else pname] = dim
    return dims


def _finite(name: str, tensor) -> np.ndarray:
    """``tensor.load()`` as float32; ``LoadError`` naming the tensor (and file) if it holds NaN
    or Inf."""
    value = tensor.load().astype(np.float32)
    bad = value.size - int(np.isfinite(value).sum())
    if bad:
        where = f"{tensor.file}: " if getattr(tensor, "file", None) else ""
        raise LoadError(f"{where}tensor {name!r} holds {bad} NaN/Inf value(s)")
    return value


def to_local(table: dict, hf: dict, params: dict, dims: dict, tp: int, rank: int,
             ep_rank: int = 0, etp: int = 1, etp_rank: int = 0) -> dict:
    """``{param: np.ndarray}`` for this rank (tp ``rank``, expert-parallel ``ep_rank``, expert
    tensor-parallel ``etp_rank`` of ``etp``). ``hf``: name -> object with ``load()`` and
    ``shape``; ``params``: param name -> local shape. ``NOT_STORED`` parameters are absent from
    the result."""
    missing_params = sorted(set(params) - set(table))
    if missing_params:
        raise KeyError(f"no Hugging Face mapping for parameter(s) {missing_params}")
    out = {}
    for pname, plist in table.items():
        if pname not in params:
            raise KeyError(f"weight table names parameter {pname!r}, which the model does not have")
        if isinstance(plist, ExpertStack):
            out[pname] = plist.local(hf, params[pname], ep_rank, pname, dims.get(pname), etp,
                                     etp_rank)
            continue
        if not plist:
            continue
        dim = dims.get(pname)
        parts = []
        for piece in plist:
            if piece.name not in hf:
                raise LoadError(f"checkpoint is missing tensor {piece.name!r} (for {pname})")
            part = piece.take(_finite(piece.name, hf[piece.name]))
            if dim is not None:
                try:
                    part = shard(part, tp, rank, dim)
                except ValueError as e:
                    raise ValueError(f"tensor {piece.name!r} (for {pname}): {e}") from None
            parts.append(part)
        value = parts[0] if len(parts) == 1 else np.concatenate(parts, 0)
        if tuple(value.shape) != tuple(params[pname]):
            names = ", ".join(p.name for p in plist)
            raise ValueError(f"shape mismatch for tensor {names}: checkpoint gives {value.shape} "
                             f"on tp rank {rank}/{tp}, parameter {pname} is {tuple(params[pname])}")
        out[pname] = value
    return out


def _unshard_fused(value: np.ndarray, rows: list, tp: int) -> np.ndarray:
    """Rank-ordered shards ``[p0_r0; p1_r0; ..; p0_r1; p1_r1; ..]`` -> ``[p0; p1; ..]``."""
    local = [r // tp for r in rows]
    chunks = np.split(value, tp, 0)  # one per rank: [p0_r; p1_r; ..]
    per_rank = [np.split(c, np.cumsum(local)[:-1], 0) for c in chunks]
    return np.concatenate([np.concatenate([pr[j] for pr in per_rank], 0)
                           for j in range(len(rows))], 0)


def to_hf(table: dict, full: dict, dims: dict | None = None, tp: int = 1, etp: int = 1) -> dict:
    """HF tensors from full parameter values ``{param: np.ndarray}``: tp=1 values, or (with
    ``tp`` > 1) the rank shards concatenated along each parameter's split dim ``dims``. Expert
    stacks must hold every expert (``[E, in, out]``, gathered over expert parallel), and with
    ``etp`` > 1 the etp shards concatenated along their split dim."""
    out, strided, ranged, transposed = {}, {}, {}, set()
    for pname, plist in table.items():
        transposed.update(p.name for p in plist if p.transposed)
        if not isinstance(plist, ExpertStack) and not plist:
            continue  # NOT_STORED
        value = full[pname]
        if isinstance(plist, ExpertStack):
            if value.shape[0] != len(plist.experts):
                raise ValueError(f"parameter {pname}: {value.shape[0]} experts given, the table "
                                 f"names {len(plist.experts)} (gather expert parallel first)")
            fused = etp > 1 and len(plist.experts[0]) > 1 and (dims or {}).get(pname) == 2
            for e, expert in enumerate(plist.experts):
                matrix = np.ascontiguousarray(value[e].T)  # [in, out] -> [out, in]
                if fused:  # [g_0; u_0; g_1; u_1] -> [g; u]
                    matrix = _unshard_fused(matrix, [p.rows for p in expert], etp)
                out.update(to_hf({pname: expert}, {pname: matrix}))
            continue
        if tp > 1 and len(plist) > 1 and (dims or {}).get(pname) == 0:
            value = _unshard_fused(value, [p.rows for p in plist], tp)
        if len(plist) == 1 and plist[0].count == 1 and plist[0].groups == 1 \
                and plist[0].offset is None:
            out[plist[0].name] = value
            continue
        sizes = [p.rows for p in plist]
        if None in sizes or sum(sizes) != value.shape[0]:
            raise ValueError(f"parameter {pname}: piece rows {sizes} do not add up to "
                             f"{value.shape[0]}")
        start = 0
        for piece in plist:
            part = value[start:start + piece.rows]
            start += piece.rows
            if piece.offset is not None:
                ranged.setdefault(piece.name, {})[piece.offset] = part
                continue
            if piece.count == 1 and piece.groups == 1:
                out[piece.name] = part
                continue
            per = piece.rows // (piece.groups * piece.span)
            buf = strided.setdefault(piece.name, np.zeros(
                (piece.groups, piece.count, per) + part.shape[1:], part.dtype))
            buf[:, piece.index:piece.index + piece.span] = part.reshape(
                (piece.groups, piece.span, per) + part.shape[1:])
    for name, buf in strided.items():
        out[name] = buf.reshape((-1,) + buf.shape[3:])
    for name, parts in ranged.items():
        offsets, rows = sorted(parts), 0
        for off in offsets:
            if off != rows:
                raise ValueError(f"{name}: the table's row ranges leave a gap at row {rows}")
            rows += parts[off].shape[0]
        out[name] = np.concatenate([parts[off] for off in offsets], 0)
    for name in transposed:
        out[name] = np.ascontiguousarray(out[name].T)  # [out, in] -> [in, out]
    return out
