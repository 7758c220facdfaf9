"""Which micro-batch each pipeline rank runs, forward or backward, in what order (pure Python).

An *action* is ``Action(kind, microbatch, chunk)``: ``kind`` is ``"F"`` (forward) or ``"B"``
(backward), ``chunk`` the model chunk (virtual stage) on this rank. Virtual stage ``v`` of a
pipeline with ``pp`` ranks and ``vpp`` chunks per rank lives on rank ``v % pp`` as chunk
``v // pp`` (Megatron's layout: rank 0 holds virtual stages 0, pp, 2 pp, ...).

Three orders, as in Megatron-core:

- ``no_pipelining_order(m)``: one rank does ``F0 B0 F1 B1 ...`` (gradient accumulation).
- ``one_f_one_b_order(pp, rank, m)``: warmup forwards, then one-forward-one-backward, then the
  remaining backwards. Rank ``r`` holds at most ``min(pp - r, m)`` activations at once.
- ``interleaved_order(pp, vpp, rank, m)``: the same three phases over ``m * vpp`` virtual
  micro-batches; chunks advance in groups of ``pp`` micro-batches (needs ``m % pp == 0``).

With ``forward_only=True`` every order is the forwards alone, in the same sequence.
``schedule_orders(pp, vpp, m)`` returns the list of every rank; ``peak_inflight`` counts
activations held (forwards whose backward has not run) and ``inflight_bound`` states the bound.
"""
from __future__ import annotations

from typing import NamedTuple


class Action(NamedTuple):
    """One step of a rank's schedule: ``kind`` "F" or "B", micro-batch id, local chunk id."""

    kind: str
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f"c{self.chunk}" if self.chunk else "")


def _check_sizes(pp: int, vpp: int, m: int) -> None:
    for name, value in (("pp size", pp), ("vpp size", vpp), ("num_microbatches", m)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def no_pipelining_order(m: int, forward_only: bool = False) -> list[Action]:
    """``F0 B0 F1 B1 ... F(m-1) B(m-1)``: one rank, gradients accumulated over micro-batches."""
    _check_sizes(1, 1, m)
    out = []
    for i in range(m):
        out.append(Action("F", i))
        if not forward_only:
            out.append(Action("B", i))
    return out


def one_f_one_b_warmup(pp: int, rank: int, m: int) -> int:
    """Forwards rank ``rank`` runs before its first backward: ``min(pp - rank - 1, m)``."""
    return min(pp - rank - 1, m)


def one_f_one_b_order(pp: int, rank: int, m: int, forward_only: bool = False) -> list[Action]:
    """Megatron's non-interleaved 1F1B order of one rank (PipeDream-Flush).

    Rank ``r`` of ``pp`` with ``m`` micro-batches, ``w = min(pp - r - 1, m)``::

        warmup    F0 .. F(w-1)                      fill the pipe downstream of this rank
        steady    F(w) B0  F(w+1) B1 ... F(m-1) B(m-1-w)   one forward, then one backward
        cooldown  B(m-w) .. B(m-1)                  drain the backwards still to come
    """
    _check_sizes(pp, 1, m)
    if not 0 <= rank < pp:
        raise ValueError(f"rank {rank} is not a stage of a {pp}-stage pipeline")
    if forward_only:
        return [Action("F", i) for i in range(m)]
    warmup = one_f_one_b_warmup(pp, rank, m)
    out = [Action("F", i) for i in range(warmup)]              # warmup
    for i in range(m - warmup):                                # steady: 1F then 1B
        out += [Action("F", i + warmup), Action("B", i)]
    out += [Action("B", i) for i in range(m - warmup, m)]      # cooldown
    return out


def check_interleaved(pp: int, vpp: int, m: int) -> None:
    """Raise unless (pp, vpp, m) is a valid interleaved configuration (Megatron's rule)."""
    _check_sizes(pp, vpp, m)
    if pp < 2:
        raise ValueError(f"interleaved schedule needs pp size >= 2, got {pp}")
    if m % pp:
        raise ValueError(f"interleaved schedule needs num_microbatches ({m}) divisible by "
                         f"pp size ({pp})")


def interleaved_chunk(k: int, pp: int, vpp: int, forward: bool) -> int:
    """Chunk of the ``k``-th virtual micro-batch: ``pp`` micro-batches per chunk, then the next
    chunk (backwards walk the chunks in reverse)."""
    chunk = (k % (pp * vpp)) // pp
    return chunk if forward else vpp - 1 - chunk


def interleaved_microbatch(k: int, pp: int, vpp: int) -> int:
    """Micro-batch id of the ``k``-th virtual micro-batch (same for forward and backward)."""
    return (k // (pp * vpp)) * pp + k % pp


def interleaved_warmup(pp: int, vpp: int, rank: int, m: int) -> int:
    """Virtual forwards before the first backward: ``2 (pp - rank - 1) + (vpp - 1) pp``, or
    all ``m * vpp`` when ``m == pp`` (Megatron runs the whole step as warmup then)."""
    total = m * vpp
    if m == pp:
        return total
    return min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)


def interleaved_order(pp: int, vpp: int, rank: int, m: int,
                      forward_only: bool = False) -> list[Action]:
    """Megatron's interleaved 1F1B order of one rank over its ``vpp`` chunks.

    The ``k``-th virtual forward is micro-batch ``interleaved_microbatch(k)`` on chunk
    ``interleaved_chunk(k, forward=True)``; backwards use the chunks in reverse. Phases::

        warmup    F(k) for k < w                      w = interleaved_warmup(...)
        steady    F(k + w) then B(k), k < m vpp - w
        cooldown  B(k) for the remaining k
    """
    check_interleaved(pp, vpp, m)
    if not 0 <= rank < pp:
        raise ValueError(f"rank {rank} is not a stage of a {pp}-stage pipeline")
    total = m * vpp

    def fwd(k):
        return Action("F", interleaved_microbatch(k, pp, vpp), interleaved_chunk(k, pp, vpp, True))

    def bwd(k):
        return Action("B", interleaved_microbatch(k, pp, vpp), interleaved_chunk(k, pp, vpp, False))

    if forward_only:
        return [fwd(k) for k in range(total)]
    warmup = interleaved_warmup(pp, vpp, rank, m)
    out = [fwd(k) for k in range(warmup)]                      # warmup
    for k in range(total - warmup):                            # steady: 1F then 1B
        out += [fwd(k + warmup), bwd(k)]
    out += [bwd(k) for k in range(total - warmup, total)]      # cooldown
    return out


def schedule_orders(pp: int, vpp: int, m: int, forward_only: bool = False) -> list[list[Action]]:
    """The order of every rank: no pipelining (pp == 1), 1F1B (vpp == 1) or interleaved."""
    _check_sizes(pp, vpp, m)
    if pp == 1:
        if vpp != 1:
            raise ValueError(f"vpp size ({vpp}) > 1 needs pp size > 1 (got pp size 1)")
        return [no_pipelining_order(m, forward_only)]
    if vpp == 1:
        return [one_f_one_b_order(pp, r, m, forward_only) for r in range(pp)]
    return [interleaved_order(pp, vpp, r, m, forward_only) for r in range(pp)]


def peak_inflight(actions: list[Action]) -> int:
    """Most activations held at once: forwards whose backward has not run yet."""
    held = peak = 0
    for a in actions:
        held += 1 if a.kind == "F" else -1
        peak = max(peak, held)
    return peak


def inflight_bound(pp: int, vpp: int, rank: int, m: int) -> int:
    """The 1F1B memory bound of ``rank``: warmup forwards plus the one in flight in the steady
    phase, i.e. ``min(pp - rank, m)`` for 1F1B (``m`` would be GPipe's: all of them)."""
    if pp == 1:
        return 1
    if vpp == 1:
        warmup, total = one_f_one_b_warmup(pp, rank, m), m
    else:
        warmup, total = interleaved_warmup(pp, vpp, rank, m), m * vpp
    return warmup + 1 if warmup < total else total


def format_order(actions: list[Action]) -> str:
    """``"F0 F1 B0 ..."`` (chunk shown as ``c1`` when not 0): for messages and tests."""
    return " ".join(map(str, actions))


def parse_order(text: str) -> list[Action]:
    """Inverse of ``format_order``: ``"F0 F1c1 B0c1"`` -> actions."""
    out = []
    for tok in text.split():
        kind, rest = tok[0], tok[1:]
        mb, _, chunk = rest.partition("c")
        out.append(Action(kind, int(mb), int(chunk or 0)))
    return out
