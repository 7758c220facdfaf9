"""Lockstep: the engine's model steps replayed on every tensor-parallel rank.

Under msrun with tp > 1 only rank 0 serves HTTP and schedules; every rank holds a tp shard of
the model, and the model's collectives need all ranks to run the same step with the same
inputs. Before each model step rank 0 broadcasts one fixed-shape int32 message over the tp
group (``mcore.comm.broadcast``; through float32 on CPU, exact for ids and positions below
2**24); the other ranks (``follow``) run the same step on their shard:

====== ========= ===================== ===========================================
op     ``a``     payload               every rank then
====== ========= ===================== ===========================================
STOP                                   leaves its loop (server shut down)
IDLE                                   nothing (rank 0 is waiting for requests)
PREFILL row      the prompt's ids      prefills the prompt and copies it into ``row``
DECODE  width w  ids [w], positions [w] runs one decode step of rows ``0 .. w-1``
====== ========= ===================== ===========================================

Message layout: ``[op, a, n, ids or prompt (n) ..., positions (w) ...]`` zero-padded to
``4 + max(max_len, 2 * max_batch)``. Sampled tokens need no message of their own: rank 0
samples from the (tp-gathered) logits and the next DECODE carries them, so every rank's slot
cache holds the same keys and values.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np

from mcore.comm import broadcast

STOP, IDLE, PREFILL, DECODE = 0, 1, 2, 3
_HEADER = 4


class Lockstep:
    """Rank 0 of ``group`` sends (``send_*``), the others ``receive``; shapes fixed by
    ``max_batch`` and ``max_len`` (the engine's)."""

    def __init__(self, group, max_batch: int, max_len: int):
        self.group = group
        self.size = _HEADER + max(max_len, 2 * max_batch)
        self.leader = group.rank == 0

    def _bcast(self, msg: np.ndarray) -> np.ndarray:
        return broadcast(ms.Tensor(msg), self.group, 0).asnumpy().astype(np.int64)

    def _send(self, op: int, a: int = 0, payload=()) -> None:
        msg = np.zeros(self.size, np.int32)
        msg[0], msg[1], msg[2] = op, a, len(payload)
        msg[_HEADER:_HEADER + len(payload)] = payload
        self._bcast(msg)

    def send_stop(self) -> None:
        self._send(STOP)

    def send_idle(self) -> None:
        self._send(IDLE)

    def send_prefill(self, row: int, prompt: list) -> None:
        self._send(PREFILL, row, list(prompt))

    def send_decode(self, ids: np.ndarray, positions: np.ndarray) -> None:
        """``ids``, ``positions``: ``[w]`` each."""
        self._send(DECODE, len(ids), np.concatenate([ids, positions]))

    def receive(self) -> tuple:
        """``(op, a, payload)`` of rank 0's next message (blocks until it is sent)."""
        msg = self._bcast(np.zeros(self.size, np.int32))
        op, a, n = (int(v) for v in msg[:3])
        return op, a, msg[_HEADER:_HEADER + n]


def follow(engine, lockstep: Lockstep) -> int:
    """A non-zero rank's loop: replay rank 0's steps on ``engine`` until STOP; returns the
    number of steps replayed."""
    steps = 0
    while True:
        op, a, payload = lockstep.receive()
        if op == STOP:
            return steps
        if op == PREFILL:
            engine.replay_prefill(a, [int(t) for t in payload])
        elif op == DECODE:
            engine.replay_decode(payload[:a].astype(np.int32), payload[a:].astype(np.int32))
        elif op != IDLE:
            raise RuntimeError(f"lockstep: unknown op {op} from rank 0")
        steps += op != IDLE
