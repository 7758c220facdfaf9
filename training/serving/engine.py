"""Engine: one thread owns the model; requests share it by continuous batching.

``Engine(model, tokenizer, max_batch, max_len, compiled=True)`` keeps ``max_batch`` rows
("slots") of a ``SlotKVCache`` of ``max_len`` columns. ``submit(request)`` may be called from
any thread; ``run()`` (the owning thread) loops until ``close()`` and the batch has drained:

1. **Admit**: while a row is free and a request waits, run its prompt alone (prefill: a
   compiled forward over the prompt right-padded to a power-of-two length, one compilation
   per bucket; PyNative with ``compiled=False``), sample its first token from the last
   logits, and copy its keys and values into the free row (``SlotKVCache.insert``; a
   multi-latent-attention model keeps its latents instead, ``latent=True``).
2. **Step**: one decode forward for rows ``0 .. w-1`` at once (``[w, 1]`` token ids, each row at
   its own position), ``w`` the smallest of ``widths`` (1, 4, 16, ... and ``max_batch``) that
   covers the highest busy row (requests take the lowest free row); compiled under
   ``mindspore.jit`` once per width unless ``compiled=False``. Each busy row samples its next
   token with its own parameters and its own ``numpy.random.default_rng(seed)``, so a request
   gets the same tokens whatever else is in the batch. Free rows inside the width compute on a
   dummy token and are ignored.
3. **Leave**: a request that produced end-of-document, reached a stop string or
   ``max_tokens`` (or whose client went away: ``request.cancelled``) frees its row at once; the
   others go on.

Each request receives ``Event``s through its ``emit`` callback (called on the engine thread):
text deltas, then one event with ``finish_reason`` ("stop" or "length") and the token counts,
or one with ``error`` (the engine is closing). ``close()`` refuses new requests, fails the
waiting ones and lets the running ones finish.

Tensor parallelism: with a ``lockstep`` (``training.serving.lockstep``) rank 0's engine
announces each prefill and decode step before running it (and IDLE while it waits, STOP when
``run`` returns); the other ranks' engines replay them (``replay_prefill``,
``replay_decode``) on their shards. ``warmup`` runs on every rank without messages.
"""
from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn

from models.generate import choose_next
from training.serving.slot_cache import SlotKVCache
from training.serving.text_stream import TextStream


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding: greedy when ``temperature == 0``, else nucleus sampling."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple = ()
    seed: int | None = None


@dataclass
class Event:
    """A piece of a request's answer; the last one has ``finish_reason`` or ``error``."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    """``prompt_ids``: the tokenised prompt (1 <= len, len + max_tokens <= the engine's
    ``max_len``, checked by the caller); ``emit(Event)`` receives the answer."""

    prompt_ids: list
    params: SamplingParams
    emit: object
    cancelled: bool = False


@dataclass
class _Row:
    request: Request
    stream: TextStream
    rng: object
    position: int  # the column (and rotary position) of the next fed token
    last: int = 0  # the token fed at the next step
    produced: int = 0


SHUTTING_DOWN = "the server is shutting down"


class EngineClosed(RuntimeError):
    """``submit`` after ``close()``."""


class _DecodeStep(nn.Cell):
    """One decode forward of rows ``0 .. w-1``: ``(ids [w, 1], positions [w, 1], key_mask
    [w, T]) -> last logits [w, V]``, writing each row's keys at the column the cache's
    ``set_positions`` gave it (= its position)."""

    def __init__(self, model, cache: SlotKVCache):
        super().__init__()
        self.model, self.cache = model, cache

    def construct(self, ids, positions, key_mask):
        logits = self.model(ids, positions, key_mask, None, self.cache)  # [b, 1, V]
        return logits[:, -1, :]


class _PrefillStep(nn.Cell):
    """A prompt forward into a one-row ``StaticKVCache``: ``(ids, positions [1, s]) -> logits
    [1, s, V]``."""

    def __init__(self, model, cache):
        super().__init__()
        self.model, self.cache = model, cache

    def construct(self, ids, positions):
        return self.model(ids, positions, None, None, self.cache)


class Engine:
    """See the module docstring."""

    def __init__(self, model, tokenizer, max_batch: int, max_len: int, compiled: bool = True,
                 lockstep=None):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"max_batch={max_batch}, max_len={max_len}: need >= 1 and >= 2")
        ms.set_context(mode=ms.PYNATIVE_MODE)  # host-side glue; the steps are jitted (compiled)
        cfg = model.config
        shape = (max_batch, cfg.num_query_groups // model.tp_group.size, max_len, cfg.head_dim)
        if cfg.multi_latent_attention:  # one latent "head" per token and layer, any tp
            shape = (max_batch, 1, max_len, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_len = max_batch, max_len
        self.cache = SlotKVCache(len(model.layer_range), shape,
                                 latent=cfg.multi_latent_attention)
        step = _DecodeStep(model, self.cache)
        self._step_fn = ms.jit(step) if compiled else step
        self._prefill_fn = self._prefill_compiled if compiled else self._prefill_eager
        if compiled:
            self._prefill_cache = model.new_cache(1, max_len)
            self._prefill_step = ms.jit(_PrefillStep(model, self._prefill_cache))
        self.widths = sorted({min(4 ** i, max_batch) for i in range(8)} | {max_batch})
        self._rows: list[_Row | None] = [None] * max_batch
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque = deque()
        self._closing = threading.Event()
        self.stats = {"steps": 0, "peak_batch": 0, "served": 0}
        self._lockstep = lockstep

    # ----- any thread
    def submit(self, request: Request) -> None:
        if self._closing.is_set():
            raise EngineClosed(SHUTTING_DOWN)
        self._inbox.put(request)

    def close(self) -> None:
        self._closing.set()
        self._inbox.put(None)  # wake the loop

    def status(self) -> dict:
        busy = sum(r is not None for r in self._rows)
        return {**self.stats, "running": busy, "waiting": len(self._waiting) + self._inbox.qsize()}

    # ----- the owning thread
    def warmup(self) -> None:
        """Compile the decode step of every width (all rows free) and the shortest prefill
        bucket."""
        for w in self.widths:
            self._decode(w, announce=False)
        if self._prefill_fn == self._prefill_compiled:
            self._prefill_compiled([self.tokenizer.eod_id])

    def run(self) -> None:
        try:
            while True:
                idle = not any(self._rows) and not self._waiting
                self._collect(block=idle)
                if self._closing.is_set():
                    self._fail_waiting(SHUTTING_DOWN)
                if idle and not self._waiting and self._lockstep is not None:
                    self._lockstep.send_idle()  # the other ranks wait in a collective
                self._admit()
                if any(self._rows):
                    self._step()
                elif self._closing.is_set():
                    return
        finally:
            if self._lockstep is not None:
                self._lockstep.send_stop()

    # ----- the other ranks under tensor parallelism (training.serving.lockstep.follow)
    def replay_prefill(self, row: int, prompt: list) -> None:
        """Rank 0's prefill of ``prompt`` into ``row``."""
        _, keys, values = self._prefill_fn(prompt)
        self.cache.insert(row, keys, values, len(prompt))

    def replay_decode(self, ids: np.ndarray, positions: np.ndarray) -> None:
        """Rank 0's decode step of rows ``0 .. w-1`` (``ids``, ``positions``: ``[w]``)."""
        self._run_decode(ids.reshape(-1, 1), positions.reshape(-1, 1))

    def _collect(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.2) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _fail_waiting(self, message: str) -> None:
        while self._waiting:
            self._waiting.popleft().emit(Event(error=message))

    def _admit(self) -> None:
        while self._waiting and None in self._rows:
            req = self._waiting.popleft()
            if req.cancelled:
                continue
            try:
                self._prefill(req, self._rows.index(None))
            except Exception as exc:  # noqa: BLE001 - a bug in one request must not stop the server
                traceback.print_exc()
                req.emit(Event(error=f"internal error: {exc}"))

    def _prefill(self, req: Request, row: int) -> None:
        length = len(req.prompt_ids)
        if self._lockstep is not None:
            self._lockstep.send_prefill(row, req.prompt_ids)
        logits, keys, values = self._prefill_fn(req.prompt_ids)
        # inserted even if the request ends here: the row stays free, every rank's cache equal
        self.cache.insert(row, keys, values, length)
        p = req.params
        state = _Row(req, TextStream(self.tokenizer.decode, list(p.stop)),
                     np.random.default_rng(p.seed), length)
        if self._accept(state, self._sample(state, logits)):
            self._rows[row] = state

    def _prefill_eager(self, prompt: list) -> tuple:
        """PyNative prompt forward with a growing ``KVCache``: ``(last logits [1, V], per-layer
        keys, values [1, n_kv, L, d])``."""
        cache = self.model.new_cache()
        logits = self.model(ms.Tensor(np.asarray([prompt], np.int32)), None, None, None, cache)
        return logits[:, -1, :].asnumpy(), cache.keys, cache.values

    def _prefill_compiled(self, prompt: list) -> tuple:
        """The prompt right-padded to a power-of-two bucket (>= 16, <= ``max_len``) through a
        compiled forward with a one-row ``StaticKVCache``; pad tokens come after the prompt, so
        the causal mask keeps them out of its keys, values and last logits."""
        length = len(prompt)
        width = min(self.max_len, max(16, 1 << (length - 1).bit_length()))
        ids = np.zeros((1, width), np.int32)
        ids[0, :length] = prompt
        self._prefill_cache.rewind()
        positions = np.arange(width, dtype=np.int32).reshape(1, width)
        logits = self._prefill_step(ms.Tensor(ids), ms.Tensor(positions))  # [1, width, V]
        return (logits[:, length - 1, :].asnumpy(), self._prefill_cache.keys,
                self._prefill_cache.values)

    def _sample(self, row: _Row, logits: np.ndarray) -> int:
        p = row.request.params
        return int(choose_next(logits, p.temperature > 0, p.temperature or 1.0, 0, p.top_p,
                               row.rng)[0])

    def _accept(self, row: _Row, token: int) -> bool:
        """Record ``token`` for ``row``; False when the request is finished (event sent)."""
        row.produced += 1
        req, reason = row.request, None
        if token == self.tokenizer.eod_id:
            delta, reason = row.stream.flush(), "stop"
        else:
            delta, stopped = row.stream.push(token)
            if stopped:
                reason = "stop"
            elif row.produced >= req.params.max_tokens:
                delta, reason = delta + row.stream.flush(), "length"
        if reason is None:
            if delta:
                req.emit(Event(text=delta))
            row.last = token
            return not req.cancelled
        req.emit(Event(text=delta, finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                       completion_tokens=row.produced))
        self.stats["served"] += 1
        return False

    def _width(self) -> int:
        """The narrowest step width covering every busy row."""
        top = max(i for i, r in enumerate(self._rows) if r is not None) + 1
        return next(w for w in self.widths if w >= top)

    def _decode(self, b: int, announce: bool = True) -> np.ndarray:
        """Logits ``[b, V]`` of one decode step over rows ``0 .. b-1`` (announced to the other
        tp ranks unless ``announce`` is False)."""
        ids = np.zeros((b, 1), np.int32)
        pos = np.zeros((b, 1), np.int32)  # a free row: dummy token 0 at position 0
        for i, row in enumerate(self._rows[:b]):
            if row is not None:
                ids[i, 0], pos[i, 0] = row.last, row.position
        if announce and self._lockstep is not None:
            self._lockstep.send_decode(ids[:, 0], pos[:, 0])
        return self._run_decode(ids, pos)

    def _run_decode(self, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """The decode forward of ``ids``, ``pos`` ``[w, 1]``: each row attends to its columns
        ``0 .. pos`` (a free row, at position 0, to column 0 only: a finite softmax)."""
        key_mask = (np.arange(self.max_len)[None, :] <= pos).astype(np.int32)  # [w, T]
        self.cache.set_positions(pos[:, 0])
        logits = self._step_fn(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(key_mask))
        return logits.asnumpy()  # [b, V]

    def _step(self) -> None:
        busy = sum(r is not None for r in self._rows)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], busy)
        self.stats["steps"] += 1
        try:
            logits = self._decode(self._width())
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            traceback.print_exc()
            for i, row in enumerate(self._rows):
                if row is not None:
                    row.request.emit(Event(error=f"internal error: {exc}"))
                    self._rows[i] = None
            return
        for i, row in enumerate(self._rows):
            if row is None:
                continue
            row.position += 1
            if not self._accept(row, self._sample(row, logits[i:i + 1])):
                self._rows[i] = None
