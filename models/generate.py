"""Text generation with a KV cache: greedy or sampling, stop tokens, batches of prompts.

``generate(model, input_ids, max_new_tokens, ...)`` returns, per prompt, the list of new
token ids (ending with the stop token when one was produced). Prompts may differ in length:
they are left-padded, padding keys are masked out and positions count real tokens only, so
each row gives the same tokens as when generated alone.

With ``use_cache=True`` the prompt is run once (prefill) and each step then feeds only the
newest token: O(new tokens) work per step. ``use_cache=False`` recomputes the whole sequence
every step in PyNative (the reference the benchmark compares against).
By default (``compiled=True``) the steps run under ``mindspore.jit`` with a ``StaticKVCache``
preallocated per request size bucket (``models.compiled_decode``: graphs compiled once per
bucket and reused by later calls; greedy decoding keeps the token loop on the device). A model
whose forward does not compile (a MoE layer with the all-to-all dispatcher,
``compiled_decode.compiles``) decodes in PyNative.
``compiled=False`` runs them in PyNative with a growing ``KVCache``; both give the same tokens.
Sampling (``do_sample``): logits / ``temperature``, then top-k, then top-p (nucleus), then a
draw from ``numpy.random.default_rng(seed)`` (on the host, in either mode).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np

from models.compiled_decode import compiles, decoder_for


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


def _cut_at_stop(tokens: np.ndarray, stop) -> list[list[int]]:
    """Each row of ``tokens [b, n]`` up to and including its first ``stop`` token."""
    out = []
    for row in tokens.tolist():
        ends = [i for i, t in enumerate(row) if t in stop]
        out.append(row[:ends[0] + 1] if ends else row)
    return out


def generate(model, input_ids, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_tokens=(), pad_token_id: int = 0, use_cache: bool = True,
             compiled: bool = True) -> list[list[int]]:
    """See the module docstring. ``input_ids``: list of token lists, array or Tensor ``[b, s]``.
    ``compiled``: compiled steps with a static cache (default), or PyNative (False)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    ids, mask = left_pad(input_ids, pad_token_id)
    if use_cache and compiled and compiles(model):
        return _generate_compiled(model, ids, mask, max_new_tokens, do_sample, temperature, top_k,
                                  top_p, seed, stop_tokens, pad_token_id)
    rng = np.random.default_rng(seed)
    cache = model.new_cache() if use_cache else None

    def next_tokens(step_ids, step_pos, key_mask):
        key_mask = None if key_mask is None else ms.Tensor(key_mask)
        logits = model(ms.Tensor(step_ids), ms.Tensor(step_pos), key_mask, None, cache)
        return choose_next(logits[:, -1, :].asnumpy(), do_sample, temperature, top_k, top_p, rng)

    return decode_loop(next_tokens, ids, mask, max_new_tokens, stop_tokens, pad_token_id, use_cache)


def _generate_compiled(model, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                       seed, stop_tokens, pad_token_id) -> list[list[int]]:
    """``generate`` with the compiled steps of the request's bucket (``models.compiled_decode``)."""
    decoder, width = decoder_for(model, ids.shape[0], ids.shape[1], max_new_tokens)
    pad = width - ids.shape[1]  # left-pad the prompts to the bucket width
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)
    mask = np.pad(mask, ((0, 0), (pad, 0)))  # [b, s] -> [b, W]
    if not do_sample:
        stop = set(int(t) for t in stop_tokens)
        return _cut_at_stop(decoder.greedy(ids, mask, max_new_tokens, stop), stop)
    rng = np.random.default_rng(seed)
    key_mask = decoder.full_mask(mask)
    decoder.start()

    def next_tokens(step_ids, step_pos, _):
        logits = decoder.logits(ms.Tensor(step_ids), ms.Tensor(step_pos), key_mask)
        return choose_next(logits.asnumpy(), do_sample, temperature, top_k, top_p, rng)

    return decode_loop(next_tokens, ids, mask, max_new_tokens, stop_tokens, pad_token_id)
