"""KVCache: keys and values of past tokens, so that a decode step only computes new tokens.

One cache per generation, one slot per layer. ``layers``: the number of layers, or the
``range`` of GLOBAL layer numbers one pipeline stage holds (``update`` takes the global number).
``update(layer, k, v)`` appends the new ``[b, n_kv, s_new, d]`` keys/values to the layer's
past ones and returns all of them ``[b, n_kv, t, d]`` and ``None`` as the query offset
(queries are the last ``s_new`` positions). ``length`` is the number of cached positions (read
it before the step's forward; it grows after the last layer's update; 0 for a cache of no
layers). A step then costs O(s_new) projections and O(s_new * t) attention instead of a full
recompute of all t tokens.

PyNative only (the cache is a Python object that changes shape each step); compiled decoding
uses ``StaticKVCache`` (same ``update`` contract).
"""
from __future__ import annotations

from mindspore import ops


class KVCache:
    """Per-layer growing key/value store; see the module docstring."""

    def __init__(self, layers: int | range):
        layers = range(layers) if isinstance(layers, int) else layers
        self.first = layers.start
        self.keys = [None] * len(layers)
        self.values = [None] * len(layers)

    @property
    def length(self) -> int:
        k = self.keys[-1] if self.keys else None
        return 0 if k is None else int(k.shape[2])

    def update(self, layer: int, k, v):
        slot = layer - self.first  # global layer number -> this cache's slot
        if self.keys[slot] is not None:
            k = ops.cat((self.keys[slot], k), 2)  # [b, n_kv, t_past + s, d]
            v = ops.cat((self.values[slot], v), 2)
        self.keys[slot], self.values[slot] = k, v
        return k, v, None
