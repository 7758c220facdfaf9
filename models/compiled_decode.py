"""Compiled KV-cache decoding: ``StaticKVCache`` steps under ``mindspore.jit``, per shape bucket.

``decoder_for(model, batch, prompt_width, max_new_tokens)`` returns the ``CompiledDecoder`` of
the bucket that request falls in, built once and kept on the model:

- cache length ``T`` = the next power of two >= ``W + max_new_tokens`` (at least 64), where
  ``W`` = the next power of two >= the longest prompt (at least 16, at most ``T - new``). The
  cache (``model.new_cache(batch, T)``: plain or MLA latent) is allocated once per
  ``(batch, T)`` and rewound for every request (unwritten slots are hidden by the causal offset);
- prompts are left-padded to ``W`` (``models.generate.left_pad`` semantics: padding keys masked,
  positions count real tokens), so a bucket compiles ONE prefill graph per ``W`` and ONE
  1-token graph, whatever the prompt lengths inside it. ``stats`` counts compiled graphs and the
  seconds their first calls took; at most ``MAX_BUCKETS`` buckets are kept (oldest dropped).

``greedy(ids, mask, ...)`` keeps the whole token loop on the device: the compiled step returns
the argmax token ``[b, 1]`` and the next positions, which feed the next step directly (no
logits or tokens copied to the host per token); stop tokens are looked at every
``check_every`` steps, and rows are cut after their first stop token at the end (a row never
depends on the others, so the extra steps change nothing). ``logits(ids, positions, key_mask)``
is the step for sampling (the host draws each token).
"""
from __future__ import annotations

import time

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from mcore.moe.dispatcher import AllToAllDispatcher

MAX_BUCKETS = 4
MIN_PROMPT_WIDTH, MIN_CACHE_LEN = 16, 64


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(prompt_width: int, max_new_tokens: int) -> tuple[int, int]:
    """``(W, T)``: the padded prompt width and the cache length of a request."""
    width = _pow2(max(MIN_PROMPT_WIDTH, prompt_width))
    return width, _pow2(max(MIN_CACHE_LEN, width + max_new_tokens))


class _Step(nn.Cell):
    """``(ids [b, s], positions [b, s], key_mask [b, T]) -> (argmax ids [b, 1] int32, next
    positions [b, 1], last logits [b, V])``; advances the cache by ``s``. One graph serves
    greedy decoding (the ids feed the next step) and sampling (the host reads the logits).
    The head runs on the last position only (``GPTModel.last_logits``)."""

    def __init__(self, model, cache):
        super().__init__()
        self.model, self.cache = model, cache

    def construct(self, ids, positions, key_mask):
        last = self.model.last_logits(ids, positions, key_mask, self.cache)  # [b, V]
        self.cache.advance(ids.shape[1])
        nxt = ops.argmax(last, -1).astype(ms.int32)  # [b]
        return nxt.reshape(-1, 1), positions[:, -1:] + 1, last  # [b] -> [b, 1]


class CompiledDecoder:
    """The compiled steps and the static cache of one ``(batch, T)`` bucket; see the module
    docstring."""

    def __init__(self, model, batch: int, cache_len: int, stats: dict):
        self.batch, self.cache_len, self.stats = batch, cache_len, stats
        self.cache = model.new_cache(batch, cache_len)
        self._step = ms.jit(_Step(model, self.cache))
        self._seen: set = set()

    def step(self, ids, positions, key_mask):
        """The compiled step ``(ids [b, s], positions [b, s], key_mask [b, T]) -> (argmax ids
        [b, 1], next positions [b, 1], last logits [b, V])`` (``_Step``); the first call of a
        shape (a compilation) is timed."""
        key = tuple(ids.shape)
        if key in self._seen:
            return self._step(ids, positions, key_mask)
        start = time.perf_counter()
        out = self._step(ids, positions, key_mask)
        out[0].asnumpy()  # wait for the result
        self._seen.add(key)
        self.stats["graphs"] += 1
        self.stats["compile_seconds"] += time.perf_counter() - start
        return out

    def full_mask(self, mask: np.ndarray) -> ms.Tensor:
        """The ``[b, T]`` key mask of a request: ``mask`` (the prompt's) then ones."""
        width = self.cache_len - mask.shape[1]
        return ms.Tensor(np.pad(mask, ((0, 0), (0, width)), constant_values=1).astype(np.int32))

    def start(self) -> None:
        """A new request: the cache is empty again."""
        self.cache.rewind()

    def logits(self, ids, positions, key_mask):
        """Last logits ``[b, V]`` of one step (prefill or one token)."""
        return self.step(ids, positions, key_mask)[2]

    def greedy(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, stop=(),
               check_every: int = 8) -> np.ndarray:
        """Greedy tokens ``[b, n]`` (``n <= max_new_tokens``: fewer when every row produced a
        stop token first) after the left-padded prompts ``ids``, ``mask`` ``[b, W]``."""
        self.start()
        key_mask = self.full_mask(mask)
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)  # [b, W]
        nxt, pos, _ = self.step(ms.Tensor(ids), ms.Tensor(positions), key_mask)
        produced, done = [nxt], np.zeros(ids.shape[0], bool)
        stop = np.asarray(sorted(set(int(t) for t in stop)), np.int32)
        for i in range(1, max_new_tokens):
            if stop.size and i % check_every == 0:
                recent = ops.cat(produced[-check_every:], 1).asnumpy()  # [b, check_every]
                done |= np.isin(recent, stop).any(1)
                if done.all():
                    break
            nxt, pos, _ = self.step(nxt, pos, key_mask)
            produced.append(nxt)
        if not max_new_tokens:
            return np.zeros((ids.shape[0], 0), np.int32)
        return ops.cat(produced, 1).asnumpy()  # [b, n]


def compiles(model) -> bool:
    """Whether ``model``'s forward compiles under ``mindspore.jit``: not when a MoE layer moves
    its tokens with the ``AllToAllDispatcher`` (planned on the host, eager only). A MoE layer
    whose ep group has one rank, as in every one-process model, uses the
    ``AllGatherDispatcher``, which compiles, dropless or not."""
    return not any(isinstance(cell, AllToAllDispatcher) for _, cell in model.cells_and_names())


def decoder_for(model, batch: int, prompt_width: int, max_new_tokens: int) -> tuple:
    """``(decoder, W)`` for a request (see the module docstring); decoders are kept in
    ``model.__dict__["_compiled_decoders"]`` with their ``stats`` (``decode_stats``)."""
    width, cache_len = bucket(prompt_width, max_new_tokens)
    store = model.__dict__.setdefault("_compiled_decoders", {})
    stats = model.__dict__.setdefault("_compiled_decode_stats",
                                      {"graphs": 0, "compile_seconds": 0.0, "buckets": 0})
    key = (batch, cache_len)
    if key not in store:
        while len(store) >= MAX_BUCKETS:
            store.pop(next(iter(store)))  # the oldest bucket
        store[key] = CompiledDecoder(model, batch, cache_len, stats)
        stats["buckets"] += 1
    return store[key], width


def decode_stats(model) -> dict:
    """``{"graphs", "compile_seconds", "buckets"}``: compiled graphs and buckets built so far
    for ``model`` by compiled generation (counts grow only when a new shape is met)."""
    return dict(model.__dict__.get("_compiled_decode_stats",
                                   {"graphs": 0, "compile_seconds": 0.0, "buckets": 0}))
