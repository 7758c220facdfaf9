"""KVCache: keys and values of past tokens, so that a decode step only computes new tokens.

One cache per generation, one slot per layer. ``update(layer, k, v)`` appends the new
``[b, n_kv, s_new, d]`` keys/values to the layer's past ones and returns all of them
``[b, n_kv, t, d]`` and ``None`` as the query offset (queries are the last ``s_new``
positions). ``length`` is the number of cached positions (read it before the step's
forward; it grows after the last layer's update). A step then costs O(s_new) projections and
O(s_new * t) attention instead of a full recompute of all t tokens.

PyNative only (the cache is a Python object that changes shape each step); compiled decoding
uses ``StaticKVCache`` (same ``update`` contract).
"""
from __future__ import annotations

from mindspore import ops


class KVCache:
    """Per-layer growing key/value store; see the module docstring."""

    def __init__(self, num_layers: int):
        self.keys = [None] * num_layers
        self.values = [None] * num_layers

    @property
    def length(self) -> int:
        k = self.keys[-1]
        return 0 if k is None else int(k.shape[2])

    def update(self, layer: int, k, v):
        if self.keys[layer] is not None:
            k = ops.cat((self.keys[layer], k), 2)  # [b, n_kv, t_past + s, d]
            v = ops.cat((self.values[layer], v), 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v, None
