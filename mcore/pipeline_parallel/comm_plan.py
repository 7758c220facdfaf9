"""Turn per-rank action orders into per-rank programs of computes and matched exchanges.

On CPU a transfer between pipeline neighbours is one SUM all-reduce over their two-rank group
(``mcore.comm.p2p.exchange``): a blocking rendezvous that both ranks must enter with mirrored
arguments, and that can carry messages both ways at once. So every rank needs, besides its
order of forwards and backwards, the exact sequence of exchanges to make with each neighbour.

Messages (``Msg``): ``act(mb, v)`` is the output of virtual stage ``v`` for micro-batch ``mb``,
sent to virtual stage ``v + 1``; ``grad(mb, v)`` is the gradient of the input of ``v``, sent to
``v - 1``. Virtual stage ``v`` lives on rank ``v % pp`` (chunk ``v // pp``), so with ``vpp > 1``
the last rank sends the next chunk's input to rank 0 (the ring pair).

``build_plans`` derives the programs from ONE global sequence of events, built round by round:
each rank runs its next action if its input has arrived, then every neighbour pair with pending
messages makes one exchange carrying all of them (both directions). Each rank's program is that
global sequence restricted to its own events, so:

- matched: an exchange appears in both ranks' programs with mirrored send / recv lists, and the
  exchanges of a pair appear in the same order on both sides (one pair group = one FIFO);
- deadlock-free: at any moment the earliest pending event of the global sequence is runnable
  (its ranks have finished all their earlier events), so the programs always make progress.

``simulate`` checks both claims independently, by executing the programs with rendezvous
semantics, and counts activations held per rank.
"""
from __future__ import annotations

from typing import NamedTuple, Union

from mcore.pipeline_parallel.schedule_order import Action


class Msg(NamedTuple):
    """A tensor moving between neighbours: ``kind`` "act" or "grad", micro-batch, virtual stage
    that produced it."""

    kind: str
    microbatch: int
    vstage: int


class Exchange(NamedTuple):
    """One two-rank exchange with pipeline rank ``peer``: ``send`` goes out, ``recv`` comes in."""

    peer: int
    send: tuple
    recv: tuple


Step = Union[Action, Exchange]


def needs(action: Action, rank: int, pp: int, vpp: int):
    """The message ``action`` must have received first, or ``None``."""
    v = action.chunk * pp + rank
    if action.kind == "F":
        return Msg("act", action.microbatch, v - 1) if v > 0 else None
    return Msg("grad", action.microbatch, v + 1) if v < pp * vpp - 1 else None


def produces(action: Action, rank: int, pp: int, vpp: int):
    """``(destination rank, message)`` that ``action`` sends afterwards, or ``None``."""
    v = action.chunk * pp + rank
    if action.kind == "F":
        return ((v + 1) % pp, Msg("act", action.microbatch, v)) if v < pp * vpp - 1 else None
    return ((v - 1) % pp, Msg("grad", action.microbatch, v)) if v > 0 else None


def build_plans(orders: list[list[Action]], vpp: int = 1) -> list[list[Step]]:
    """Per-rank programs (actions and ``Exchange``s) for the given per-rank orders.

    Raises ``ValueError`` naming the blocked ranks if the orders cannot complete (e.g. a rank
    waits for a micro-batch its neighbour only produces later)."""
    pp = len(orders)
    plans: list[list[Step]] = [[] for _ in range(pp)]
    ptr = [0] * pp
    have: list[set] = [set() for _ in range(pp)]
    outbox: dict[tuple[int, int], list[Msg]] = {}   # (src, dst) -> messages not yet sent
    while any(ptr[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):  # 1) every rank runs its next action if its input is here
            if ptr[r] == len(orders[r]):
                continue
            action = orders[r][ptr[r]]
            need = needs(action, r, pp, vpp)
            if need is not None and need not in have[r]:
                continue
            have[r].discard(need)
            plans[r].append(action)
            ptr[r] += 1
            progressed = True
            out = produces(action, r, pp, vpp)
            if out is not None:
                outbox.setdefault((r, out[0]), []).append(out[1])
        pairs = sorted({(min(s, d), max(s, d)) for (s, d), msgs in outbox.items() if msgs})
        for a, b in pairs:  # 2) each neighbour pair with pending messages: one exchange
            ab, ba = tuple(outbox.pop((a, b), ())), tuple(outbox.pop((b, a), ()))
            plans[a].append(Exchange(b, ab, ba))
            plans[b].append(Exchange(a, ba, ab))
            have[b].update(ab)
            have[a].update(ba)
            progressed = True
        if not progressed:
            blocked = [f"rank {r} at {orders[r][ptr[r]]} (needs "
                       f"{needs(orders[r][ptr[r]], r, pp, vpp)})"
                       for r in range(pp) if ptr[r] < len(orders[r])]
            raise ValueError("schedule orders cannot complete: " + "; ".join(blocked))
    return plans


class SimResult(NamedTuple):
    """What ``simulate`` measured, per rank: most activations held, exchanges made."""

    peak_inflight: list
    exchanges: list


def simulate(plans: list[list[Step]], vpp: int = 1) -> SimResult:
    """Execute the programs with blocking two-rank rendezvous semantics; raise ``ValueError``
    on a deadlock (naming each blocked rank's step), a mismatched exchange, an action that runs
    before its input arrived, or a message sent twice / never sent / never used."""
    pp = len(plans)
    ptr = [0] * pp
    have: list[set] = [set() for _ in range(pp)]
    ready: list[set] = [set() for _ in range(pp)]  # produced, not yet sent
    held, peak, exchanges = [0] * pp, [0] * pp, [0] * pp
    while True:
        progressed = False
        for r in range(pp):
            while ptr[r] < len(plans[r]):
                step = plans[r][ptr[r]]
                if isinstance(step, Action):
                    need = needs(step, r, pp, vpp)
                    if need is not None and need not in have[r]:
                        raise ValueError(f"rank {r} runs {step} before receiving {need}")
                    have[r].discard(need)
                    out = produces(step, r, pp, vpp)
                    if out is not None:
                        ready[r].add(out[1])
                    held[r] += 1 if step.kind == "F" else -1
                    peak[r] = max(peak[r], held[r])
                    ptr[r] += 1
                    progressed = True
                    continue
                p = step.peer
                other = plans[p][ptr[p]] if ptr[p] < len(plans[p]) else None
                if not isinstance(other, Exchange) or other.peer != r:
                    break  # wait for the peer to reach its side of the rendezvous
                if other.send != step.recv or other.recv != step.send:
                    raise ValueError(f"mismatched exchange between ranks {r} and {p}: rank {r} "
                                     f"sends {step.send} expects {step.recv}; rank {p} sends "
                                     f"{other.send} expects {other.recv}")
                for src, dst, msgs in ((r, p, step.send), (p, r, other.send)):
                    missing = [m for m in msgs if m not in ready[src]]
                    if missing:
                        raise ValueError(f"rank {src} sends {missing} before producing it")
                    ready[src].difference_update(msgs)
                    have[dst].update(msgs)
                ptr[r] += 1
                ptr[p] += 1
                exchanges[r] += 1
                exchanges[p] += 1
                progressed = True
        if all(ptr[r] == len(plans[r]) for r in range(pp)):
            break
        if not progressed:
            blocked = [f"rank {r} at {plans[r][ptr[r]]}" for r in range(pp)
                       if ptr[r] < len(plans[r])]
            raise ValueError("deadlock: " + "; ".join(blocked))
    leftover = [(r, sorted(ready[r] | have[r])) for r in range(pp) if ready[r] or have[r]]
    if leftover:
        raise ValueError(f"messages never sent or never used: {leftover}")
    return SimResult(peak, exchanges)
