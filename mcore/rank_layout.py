"""Pure rank arithmetic for a Megatron-style parallel layout (no MindSpore, no communication).

A world of ``W`` ranks is viewed as a grid whose axes are listed in an order string, the first
axis varying fastest (Megatron semantics). With the default order ``tp-cp-ep-dp-pp`` and
``W = 8, tp = 2, pp = 2`` (so ``dp = 2``)::

    rank:  0 1 2 3 4 5 6 7
    tp:    0 1 0 1 0 1 0 1      tp groups  [0,1] [2,3] [4,5] [6,7]
    dp:    0 0 1 1 0 0 1 1      dp groups  [0,2] [1,3] [4,6] [5,7]
    pp:    0 0 0 0 1 1 1 1      pp groups  [0,4] [1,5] [2,6] [3,7]

Dense layers use the grid (tp, cp, dp, pp) with ``dp = W / (tp * cp * pp)``; expert layers use a
second grid (etp, ep, edp, pp) over the same ranks with ``edp = W / (etp * ep * pp)``, as in
Megatron-core. Both grids read the same order string (``ep`` is ignored by the dense grid and
``cp`` by the expert grid), so the pp axis is identical in both.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

AXES = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"


def parse_order(order: str) -> tuple[str, ...]:
    """Split an order string such as ``"tp-cp-ep-dp-pp"``; every axis must appear exactly once."""
    names = tuple(order.split("-"))
    unknown = [a for a in names if a not in AXES]
    if unknown:
        raise ValueError(f"order {order!r}: unknown axis {unknown[0]!r} (allowed: {', '.join(AXES)})")
    dup = sorted({a for a in names if names.count(a) > 1})
    if dup:
        raise ValueError(f"order {order!r}: axis {dup[0]!r} appears more than once")
    missing = [a for a in AXES if a not in names]
    if missing:
        raise ValueError(f"order {order!r}: missing axis {missing[0]!r} (needs all of {', '.join(AXES)})")
    return names


@dataclass(frozen=True)
class Grid:
    """A world laid out on named axes; ``sizes[i]`` belongs to ``axes[i]``, ``axes[0]`` fastest."""

    axes: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def world(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n

    def strides(self) -> tuple[int, ...]:
        out, acc = [], 1
        for s in self.sizes:
            out.append(acc)
            acc *= s
        return tuple(out)

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank`` on every axis."""
        return {a: (rank // st) % s for a, st, s in zip(self.axes, self.strides(), self.sizes)}

    def groups(self, token: str) -> list[list[int]]:
        """All groups that vary exactly the axes in ``token`` (e.g. ``"tp"`` or ``"tp-dp"``).

        Each group lists its ranks with the token's axes varying in grid order (first axis
        fastest); groups are ordered by the remaining axes, first axis fastest. Every rank is in
        exactly one group.
        """
        want = set(token.split("-"))
        unknown = want - set(self.axes)
        if unknown:
            raise ValueError(f"group token {token!r}: axis {sorted(unknown)[0]!r} is not in {self.axes}")
        st = self.strides()
        inner = [i for i, a in enumerate(self.axes) if a in want]
        outer = [i for i, a in enumerate(self.axes) if a not in want]
        result = []
        # itertools.product varies its LAST argument fastest; reverse to make axes[0] fastest.
        for out_idx in itertools.product(*[range(self.sizes[i]) for i in reversed(outer)]):
            base = sum(st[i] * c for i, c in zip(reversed(outer), out_idx))
            members = []
            for in_idx in itertools.product(*[range(self.sizes[i]) for i in reversed(inner)]):
                members.append(base + sum(st[i] * c for i, c in zip(reversed(inner), in_idx)))
            result.append(sorted(members))
        return result


def _divide(world: int, parts: dict[str, int], what: str) -> int:
    prod = 1
    for v in parts.values():
        prod *= v
    if world % prod:
        sizes = " * ".join(f"{k}={v}" for k, v in parts.items())
        raise ValueError(f"world size {world} is not divisible by {sizes} = {prod} ({what})")
    return world // prod


@dataclass(frozen=True)
class RankLayout:
    """Sizes of every parallel axis for one world, validated; builds the dense and expert grids.

    ``dp`` is derived: ``world / (tp * cp * pp)``. ``edp`` (expert data parallel) is derived:
    ``world / (etp * ep * pp)``. ``etp`` (expert tensor parallel) defaults to ``tp``.
    """

    world: int
    tp: int = 1
    cp: int = 1
    ep: int = 1
    pp: int = 1
    etp: int | None = None
    order: str = DEFAULT_ORDER

    def __post_init__(self):
        for name in ("world", "tp", "cp", "ep", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise ValueError(f"etp must be a positive integer, got {self.etp!r}")
        parse_order(self.order)
        _divide(self.world, {"tp": self.tp, "cp": self.cp, "pp": self.pp}, "dense layout")
        _divide(self.world, {"etp": self.expert_tp, "ep": self.ep, "pp": self.pp}, "expert layout")

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.expert_tp * self.ep * self.pp)

    def dense_grid(self) -> Grid:
        sizes = {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}
        axes = tuple(a for a in parse_order(self.order) if a != "ep")
        return Grid(axes, tuple(sizes[a] for a in axes))

    def expert_grid(self) -> Grid:
        sizes = {"tp": self.expert_tp, "ep": self.ep, "dp": self.expert_dp, "pp": self.pp}
        axes = tuple(a for a in parse_order(self.order) if a != "cp")
        return Grid(axes, tuple(sizes[a] for a in axes))

    def group_table(self) -> dict[str, list[list[int]]]:
        """Every named group kind -> its list of rank groups (each rank in exactly one per kind).

        Kinds: ``tp, cp, dp, pp`` (dense axes); ``dp_cp`` (gradient sync with context parallel);
        ``tp_dp`` (sequence parallel + ZeRO); ``tp_cp``; ``mp`` (model parallel = tp x pp);
        ``ep, etp, edp`` (expert axes); ``embedding`` (the first and last pp stage of each pp
        group, which hold the tied input / output embeddings; a middle stage is alone in its own
        embedding group, so syncing tied embeddings is a no-op there).
        """
        dense, expert = self.dense_grid(), self.expert_grid()
        table = {
            "tp": dense.groups("tp"),
            "cp": dense.groups("cp"),
            "dp": dense.groups("dp"),
            "pp": dense.groups("pp"),
            "dp_cp": dense.groups("cp-dp"),
            "tp_dp": dense.groups("tp-dp"),
            "tp_cp": dense.groups("tp-cp"),
            "mp": dense.groups("tp-pp"),
            "ep": expert.groups("ep"),
            "etp": expert.groups("tp"),
            "edp": expert.groups("dp"),
        }
        table["embedding"] = []
        for g in table["pp"]:
            table["embedding"].append(sorted({g[0], g[-1]}))
            table["embedding"].extend([r] for r in g[1:-1])
        return table

    def groups_of(self, rank: int) -> dict[str, list[int]]:
        """For one rank: kind -> the ranks of the group it belongs to."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside world size {self.world}")
        return {kind: next(g for g in groups if rank in g) for kind, groups in self.group_table().items()}
