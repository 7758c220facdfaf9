"""Text generation with a KV cache: greedy or sampling, stop tokens, batches of prompts.

``generate(model, input_ids, max_new_tokens, ...)`` returns, per prompt, the list of new
token ids (ending with the stop token when one was produced). Prompts may differ in length:
they are left-padded, padding keys are masked out and positions count real tokens only, so
each row gives the same tokens as when generated alone.

With ``use_cache=True`` the prompt is run once (prefill) and each step then feeds only the
newest token (``KVCache``): O(new tokens) work per step. ``use_cache=False`` recomputes the
whole sequence every step (the reference the benchmark compares against).
Sampling (``do_sample``): logits / ``temperature``, then top-k, then top-p (nucleus), then a
draw from ``numpy.random.default_rng(seed)``. Steps run in PyNative, or compiled with
``compiled=True`` (a ``StaticKVCache`` sized prompt + ``max_new_tokens``).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn


def left_pad(prompts, pad_id: int):
    """``(ids [b, w], mask [b, w])``: prompts left-padded to the longest; mask 1 = real token."""
    if isinstance(prompts, ms.Tensor):
        prompts = prompts.asnumpy()
    rows = [list(map(int, p)) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("input_ids: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def _filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set logits outside the top-k / top-p set to -inf (rows of ``[b, V]``)."""
    out = logits.copy()
    if top_k and top_k < out.shape[-1]:
        kth = np.sort(out, -1)[:, -top_k][:, None]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, -1)
        sorted_logits = np.take_along_axis(out, order, -1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        before = np.cumsum(probs, -1) - probs  # mass of the tokens ranked above each one
        drop = before >= top_p
        drop[:, 0] = False
        np.put_along_axis(out, order, np.where(drop, -np.inf, sorted_logits), -1)
    return out


def choose_next(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
            rng) -> np.ndarray:
    """Next token per row of ``logits [b, V]``: argmax, or a draw (temperature, top-k, top-p)."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 when sampling")
    scaled = _filter(logits.astype(np.float64) / temperature, top_k, top_p)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


class _CachedStep(nn.Cell):
    """One forward of ``model`` with a ``StaticKVCache`` attached (compiled by ``mindspore.jit``)."""

    def __init__(self, model, cache):
        super().__init__()
        self.model, self.cache = model, cache

    def construct(self, ids, positions, key_mask=None):
        logits = self.model(ids, positions, key_mask, None, self.cache)
        self.cache.advance(ids.shape[1])
        return logits


def _stepper(model, use_cache: bool, compiled: bool, batch: int, max_len: int):
    """``step(ids, positions, key_mask) -> logits`` for this generation."""
    if not use_cache:
        return model
    if not compiled:
        cache = model.new_cache()

        def step(ids, positions, key_mask):
            return model(ids, positions, key_mask, None, cache)
        return step
    # One compiled step per (batch, max_len), kept on the model so that later generations reuse
    # the compiled graphs; the cache is rewound (stale slots are hidden by the causal offset).
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    if (batch, max_len) not in steps:
        cache = model.new_cache(batch, max_len)
        steps[(batch, max_len)] = (ms.jit(_CachedStep(model, cache)), cache)
    step, cache = steps[(batch, max_len)]
    cache.rewind()
    return step


def decode_loop(next_tokens, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int,
                stop_tokens=(), pad_token_id: int = 0, use_cache: bool = True) -> list[list[int]]:
    """The token loop shared by ``generate`` and ``models.generate_pipeline``: per prompt, the
    new token ids (ending with a stop token when one was produced).

    ``ids``, ``mask``: the left-padded prompts (``left_pad``). ``next_tokens(step_ids [b, n],
    step_pos [b, n], key_mask)`` returns the next token of every row (``[b]``); ``key_mask`` is
    the ``[b, t]`` real-key mask of everything fed so far, or None when no prompt is padded.
    With ``use_cache`` each step after the prompt feeds only the newest tokens, else the whole
    sequence."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    b = ids.shape[0]
    stop = set(int(t) for t in stop_tokens)
    padded = not mask.all()
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)  # [b, s]
    out = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        nxt = next_tokens(step_ids, step_pos, mask if padded else None)
        nxt = np.where(done, pad_token_id, nxt).astype(np.int32)
        for i in np.flatnonzero(~done):
            out[i].append(int(nxt[i]))
            done[i] = int(nxt[i]) in stop
        if done.all():
            break
        new_pos = positions[:, -1:] + 1  # [b, 1]
        ids = np.concatenate([ids, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones((b, 1), np.int32)], 1)
        positions = np.concatenate([positions, new_pos], 1)
        step_ids, step_pos = (nxt[:, None], new_pos) if use_cache else (ids, positions)
    return out


def generate(model, input_ids, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_tokens=(), pad_token_id: int = 0, use_cache: bool = True,
             compiled: bool = False) -> list[list[int]]:
    """See the module docstring. ``input_ids``: list of token lists, array or Tensor ``[b, s]``.
    ``compiled``: run the cached steps under ``mindspore.jit`` with a ``StaticKVCache`` (one
    compilation for the prompt shape and one for the 1-token step)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    ids, mask = left_pad(input_ids, pad_token_id)
    rng = np.random.default_rng(seed)
    max_len = ids.shape[1] + max_new_tokens
    static = compiled and use_cache
    step = _stepper(model, use_cache, compiled, ids.shape[0], max_len)

    def next_tokens(step_ids, step_pos, key_mask):
        if key_mask is not None and static:  # a static cache needs the mask over all max_len slots
            key_mask = np.pad(key_mask, ((0, 0), (0, max_len - key_mask.shape[1])), constant_values=1)
        key_mask = None if key_mask is None else ms.Tensor(key_mask)
        logits = step(ms.Tensor(step_ids), ms.Tensor(step_pos), key_mask)
        return choose_next(logits[:, -1, :].asnumpy(), do_sample, temperature, top_k, top_p, rng)

    return decode_loop(next_tokens, ids, mask, max_new_tokens, stop_tokens, pad_token_id, use_cache)
