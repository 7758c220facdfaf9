"""StaticKVCache: a fixed-size key/value cache that compiled (``mindspore.jit``) decoding can use.

Each layer owns two non-trainable Parameters ``[b, n_kv, max_len, d]``; ``position`` (an
int32 Parameter) is the number of positions already written. ``update(layer, k, v)`` writes
the new ``[b, n_kv, s, d]`` keys/values at ``[position, position + s)`` (``s == 1``: one
column scattered in place, ``position < max_len``; or a prefill at ``position == 0``) and
returns the whole buffers plus ``position`` as the query offset: query ``i`` sits at
``position + i`` and sees keys ``j <= position + i``, which also hides the unwritten slots.
Shapes never change, so a step compiles once per (batch, s). The caller advances
``position`` after each step's forward (``advance``, inside the same compiled function); the
model never does.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


class StaticKVCache(nn.Cell):
    """See the module docstring. ``shape`` = ``(b, n_kv_local, max_len, head_dim)``;
    ``layers``: the number of layers, or the ``range`` of GLOBAL layer numbers of a pipeline
    stage (``update`` takes the global number). ``values=False`` keeps only the key buffers
    (``mcore.transformer.latent_cache.StaticLatentKVCache`` stores one latent per token);
    ``value_dim`` (None: ``head_dim``) is the width of the value buffers when it differs from
    the keys' (multi-latent attention's expanded ``v_head_dim``)."""

    def __init__(self, layers: int | range, shape: tuple, dtype=ms.float32, values: bool = True,
                 value_dim: int | None = None):
        super().__init__()
        layers = range(layers) if isinstance(layers, int) else layers
        self.first = layers.start
        self.max_len = shape[2]
        zeros = Tensor(np.zeros(shape, np.float32)).astype(dtype)
        self.keys = ParameterTuple(Parameter(zeros.copy(), name=f"k{i}", requires_grad=False)
                                   for i in layers)  # [b, n_kv, max_len, d] each
        v_shape = tuple(shape[:3]) + (shape[3] if value_dim is None else value_dim,)
        v_zeros = Tensor(np.zeros(v_shape, np.float32)).astype(dtype)
        self.values = ParameterTuple(Parameter(v_zeros.copy(), name=f"v{i}", requires_grad=False)
                                     for i in layers) if values else ()  # [b, n_kv, max_len, dv]
        self.position = Parameter(Tensor(0, ms.int32), name="position", requires_grad=False)
        self.slots = Tensor(np.arange(self.max_len, dtype=np.int32).reshape(1, 1, -1, 1))
        grid = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(1),
                                    indexing="ij"), -1)[:, :, 0]  # [b, n_kv, 3]
        self.rows_heads = Tensor(grid.astype(np.int32))  # (row, head, 0) of each (row, head)
        self.column = Tensor(np.array([0, 0, 1], np.int32))  # [3]: adds the column index

    @property
    def length(self) -> int:
        return int(self.position.asnumpy())

    def advance(self, n: int):
        """Mark ``n`` more positions as written; call after the step's forward, in the same
        (compiled) function: ``ops.assign`` keeps the order of reads and writes of ``position``
        (``Parameter.set_data`` from Python is not seen by an already compiled graph)."""
        return ops.assign(self.position, self.position + n)

    def rewind(self) -> None:
        """Start a new sequence (PyNative, between compiled calls): position = 0."""
        ops.assign(self.position, Tensor(0, ms.int32))

    def _index(self):
        """``[b, n_kv, 3]``: the (row, head, column ``position``) of each one-token write."""
        return self.rows_heads + self.position * self.column

    def _write(self, buf, new, index=None):
        s = new.shape[2]
        if s == 1:  # one token: scatter its [b, n_kv, d] into column ``position`` in place
            index = self._index() if index is None else index
            # [b, n_kv, 1, d] -> [b, n_kv, d]: one d-vector per (row, head) index
            return ops.scatter_nd_update(buf, index, new.reshape(new.shape[:2] + new.shape[3:]))
        if s != self.max_len:  # [b, n_kv, s, d] -> [b, n_kv, max_len, d]
            pad = ops.zeros((new.shape[0], new.shape[1], self.max_len - s, new.shape[3]), new.dtype)
            new = ops.cat((new, pad), 2)
        start = self.position
        written = ops.logical_and(self.slots >= start, self.slots < start + s)  # [1, 1, T, 1]
        out = ops.where(written, new, buf)
        ops.assign(buf, out)
        return out

    def update(self, layer: int, k, v):
        slot = layer - self.first  # global layer number -> this cache's slot
        index = self._index() if k.shape[2] == 1 else None  # shared by the two writes
        return (self._write(self.keys[slot], k, index), self._write(self.values[slot], v, index),
                self.position)
