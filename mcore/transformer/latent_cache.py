"""Latent KV caches for multi-latent attention: one compressed vector per token and layer.

MLA (``mcore.transformer.mla``) needs, for every past token, only the normalised key/value
latent ``c`` (``kv_lora_rank`` values) and the rotated rotary key ``k_pe`` (``qk_rope_head_dim``
values, shared by all heads). These caches store ``[c, k_pe]`` as ONE head
``[b, 1, t, kv_lora_rank + qk_rope_head_dim]`` per layer, instead of per-head keys and values
``[b, n, t, qk_head_dim]`` + ``[b, n, t, v_head_dim]``; attention then runs in the latent space
with the key/value up-projection absorbed into the query and the output (see the MLA module).

``update_latent(layer, ckv [b, 1, s, r + dr]) -> (all [b, 1, t, r + dr], q_offset)`` has the
contract of ``update`` of the plain caches (``q_offset`` None: queries are the last ``s``
positions; a Tensor: position of query 0). ``latent = True`` tells attention which call to use;
``length``, ``advance`` and ``rewind`` behave as in the plain caches.

- ``LatentKVCache``: grows by concatenation (PyNative).
- ``StaticLatentKVCache``: fixed ``max_len`` buffers (``mindspore.jit`` decoding).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mcore.transformer.kv_cache import KVCache
from mcore.transformer.static_kv_cache import StaticKVCache


class LatentKVCache(KVCache):
    """Growing latent cache (PyNative); see the module docstring."""

    latent = True

    def update_latent(self, layer: int, ckv):
        slot = layer - self.first  # global layer number -> this cache's slot
        if self.keys[slot] is not None:
            ckv = ops.cat((self.keys[slot], ckv), 2)  # [b, 1, t_past + s, r + dr]
        self.keys[slot] = ckv
        return ckv, None

    def update(self, layer: int, k, v):
        raise TypeError("LatentKVCache holds MLA latents: use update_latent (a multi-latent "
                        "attention layer), not update")


class StaticLatentKVCache(StaticKVCache):
    """Fixed-size latent cache; ``shape = (b, 1, max_len, kv_lora_rank + qk_rope_head_dim)``;
    see the module docstring and ``StaticKVCache`` for ``position`` / ``advance``."""

    latent = True

    def __init__(self, layers: int | range, shape: tuple, dtype=ms.float32):
        super().__init__(layers, shape, dtype, values=False)

    def update_latent(self, layer: int, ckv):
        slot = layer - self.first  # global layer number -> this cache's slot
        return self._write(self.keys[slot], ckv), self.position

    def update(self, layer: int, k, v):
        raise TypeError("StaticLatentKVCache holds MLA latents: use update_latent (a "
                        "multi-latent attention layer), not update")


def latent_cache_bytes_per_token(kv_lora_rank: int, qk_rope_head_dim: int, num_layers: int,
                                 itemsize: int = 4) -> int:
    """Bytes one token occupies in a latent cache of ``num_layers`` layers."""
    return (kv_lora_rank + qk_rope_head_dim) * num_layers * itemsize
