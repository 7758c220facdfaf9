"""SlotKVCache: a fixed-size key/value cache whose rows ("slots") hold independent sequences.

Continuous batching keeps up to ``b`` requests in flight, each at its own length. Every layer
owns two non-trainable Parameters ``[b, n_kv, max_len, d]``; ``position`` (int32 ``[b]``) is the
column each row writes at the next step (the number of tokens that row has cached).

- ``update(layer, k, v)`` (``k``, ``v``: ``[w, n_kv, 1, d]``, one new token for each of the
  first ``w <= b`` rows: a step may run on a prefix of the rows) writes row ``r`` at column
  ``position[r]`` and returns those rows' buffers ``[w, n_kv, max_len, d]`` plus
  ``max_len - 1`` as the query offset, so the causal rule lets the query see every column: the
  caller's ``key_mask [w, max_len]`` (1 for columns ``<= position[r]``) hides the unwritten and
  stale ones. Shapes depend only on ``w``, so a decode step compiles once per width.
- ``set_positions(pos)`` (PyNative, before each step) and ``insert(row,
  keys, values, L)`` (PyNative, between steps: copy a prefilled prompt's first ``L`` keys and
  values of every layer into columns ``[0, L)`` of one row) are the serving engine's calls.

Same ``update`` contract as ``mcore.transformer.KVCache`` / ``StaticKVCache``. With
``latent=True`` (multi-latent attention, ``mcore.transformer.latent_cache``) each layer keeps
one buffer ``[b, 1, max_len, kv_lora_rank + qk_rope_head_dim]`` written by
``update_latent(layer, ckv)`` (same rows, columns and query offset as ``update``); ``insert``
then copies the prefilled latents only.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


class SlotKVCache(nn.Cell):
    """See the module docstring. ``shape`` = ``(b, n_kv, max_len, head_dim)`` (latent: ``(b, 1,
    max_len, latent width)``); ``layers``: the number of layers (global layer numbers
    ``0 .. layers - 1``)."""

    def __init__(self, layers: int, shape: tuple, dtype=ms.float32, latent: bool = False):
        super().__init__()
        self.latent = bool(latent)
        self.batch, self.max_len = shape[0], shape[2]
        zeros = Tensor(np.zeros(shape, np.float32)).astype(dtype)
        self.keys = ParameterTuple(Parameter(zeros.copy(), name=f"slot_k{i}", requires_grad=False)
                                   for i in range(layers))  # [b, n_kv, max_len, d] each
        self.values = () if latent else ParameterTuple(
            Parameter(zeros.copy(), name=f"slot_v{i}", requires_grad=False) for i in range(layers))
        self.position = Parameter(Tensor(np.zeros(shape[0], np.int32)), name="slot_position",
                                  requires_grad=False)
        self.slots = Tensor(np.arange(self.max_len, dtype=np.int32).reshape(1, 1, -1, 1))

    def set_positions(self, positions: np.ndarray) -> None:
        """Before a step (PyNative, between compiled calls): ``positions [w]`` (``w <= b``) are
        the columns rows ``0 .. w-1`` write at (a step of width ``w`` leaves the other rows
        alone). Written with ``ops.assign``, which an already compiled graph sees, so the graph
        itself only reads ``position``."""
        full = np.zeros(self.batch, np.int32)
        full[:len(positions)] = positions
        ops.assign(self.position, Tensor(full))

    def _write(self, buf, new):
        w = new.shape[0]  # the step's width: rows 0 .. w-1
        part = buf if w == self.batch else buf[:w]  # [w, n_kv, max_len, d]
        new = ops.broadcast_to(new, part.shape)  # [w, n_kv, 1, d] -> [w, n_kv, max_len, d]
        at = self.position.reshape(-1, 1, 1, 1)[:w]  # [b] -> [w, 1, 1, 1]
        out = ops.where(self.slots == at, new, part)  # row r written at column position[r]
        ops.assign(buf, out if w == self.batch else ops.cat((out, buf[w:]), 0))
        return out

    def update(self, layer: int, k, v):
        return self._write(self.keys[layer], k), self._write(self.values[layer], v), \
            self.max_len - 1

    def update_latent(self, layer: int, ckv):
        return self._write(self.keys[layer], ckv), self.max_len - 1

    def insert(self, row: int, keys: list, values: list, length: int) -> None:
        """Copy the first ``length`` positions of one prefilled sequence (per layer
        ``[1, n_kv, >= length, d]``) into columns ``[0, length)`` of ``row`` (PyNative)."""
        for bufs, news in ((self.keys, keys), (self.values, values)):
            for buf, new in zip(bufs, news):
                data = buf.asnumpy().copy()
                data[row, :, :length] = new.asnumpy()[0, :, :length]  # [n_kv, L, d]
                ops.assign(buf, Tensor(data, buf.dtype))
