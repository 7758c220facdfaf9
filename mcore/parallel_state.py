"""Explicit parallel state: one ``ParallelDims`` object owns every process group of this rank.

Build it once per process and pass the groups a layer needs to that layer::

    dims = ParallelDims.build(tp=2, pp=2)      # calls mindspore init() when world > 1
    layer = ColumnParallelLinear(512, 1024, tp_group=dims.tp)

Nothing here is global. A world of one rank needs no ``init()``; every group of size one is a
``ProcessGroup`` with ``comm_name=None`` and the collectives in ``mcore.comm`` return at once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mcore.rank_layout import DEFAULT_ORDER, RankLayout

@dataclass(frozen=True)
class ProcessGroup:
    """One communication group as seen from one rank.

    ``ranks``: global ranks of the members, ascending. ``rank``: this process's index inside
    ``ranks``. ``comm_name``: the MindSpore group name, or ``None`` for a group of size one (no
    communication ever happens on it). ``native``: use the device's native collective kernels
    instead of compositions from a SUM all-reduce (decided once, by ``mcore.comm.backend``, when
    the group is built, so that compiled code reads a constant).
    """

    kind: str
    ranks: tuple[int, ...]
    rank: int
    comm_name: str | None
    native: bool = False

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    @staticmethod
    def single(kind: str = "self", global_rank: int = 0) -> "ProcessGroup":
        """A group holding only this rank: every collective on it is the identity."""
        return ProcessGroup(kind, (global_rank,), 0, None)


def group_name(ranks: tuple[int, ...]) -> str:
    """A stable MindSpore group name for a member list (same members -> same group)."""
    digest = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:12]
    return f"msf_{len(ranks)}_{digest}"


@dataclass(frozen=True)
class ParallelDims:
    """The parallel layout of this rank and its process groups.

    Attributes are ``ProcessGroup``s: ``tp, cp, dp, pp, dp_cp, tp_dp, tp_cp, mp, ep, etp, edp,
    embedding`` (see ``RankLayout.group_table`` for their meaning), plus ``world`` (all ranks)
    and ``pp_next_pair`` / ``pp_prev_pair`` (this rank and its next / previous pipeline stage, the
    two-rank groups used by ``mcore.comm.p2p``).
    ``pp_next`` / ``pp_prev`` are the global ranks of the next / previous pipeline stage (ring).
    """

    layout: RankLayout
    global_rank: int
    groups: dict = field(repr=False)

    def __getattr__(self, name):
        groups = self.__dict__.get("groups", {})
        if name in groups:
            return groups[name]
        raise AttributeError(f"ParallelDims has no group or attribute {name!r}")

    @property
    def world_size(self) -> int:
        return self.layout.world

    @property
    def pp_stage(self) -> int:
        return self.groups["pp"].rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.layout.pp - 1

    @property
    def pp_next(self) -> int:
        g = self.groups["pp"]
        return g.ranks[(g.rank + 1) % g.size]

    @property
    def pp_prev(self) -> int:
        g = self.groups["pp"]
        return g.ranks[(g.rank - 1) % g.size]

    @classmethod
    def from_layout(cls, layout: RankLayout, global_rank: int, create_groups: bool = False):
        """Groups of ``global_rank`` under ``layout``; ``create_groups`` registers them with
        MindSpore (requires ``init()``; each group of size > 1 is created once, by its members)."""
        table = layout.groups_of(global_rank)
        table["world"] = list(range(layout.world))
        pp = table["pp"]
        stage = pp.index(global_rank)
        table["pp_next_pair"] = sorted({global_rank, pp[(stage + 1) % len(pp)]})
        table["pp_prev_pair"] = sorted({global_rank, pp[(stage - 1) % len(pp)]})
        groups, created = {}, set()
        native = False
        if create_groups:
            from mcore.comm.backend import use_native

            native = use_native()
        for kind, ranks in table.items():
            ranks = tuple(ranks)
            name = None
            if len(ranks) > 1:
                name = group_name(ranks)
                if create_groups and name not in created:
                    from mindspore.communication import create_group

                    create_group(name, list(ranks))
                    created.add(name)
            groups[kind] = ProcessGroup(kind, ranks, ranks.index(global_rank), name, native)
        return cls(layout, global_rank, groups)

    @classmethod
    def build(cls, tp: int = 1, cp: int = 1, ep: int = 1, pp: int = 1, etp: int | None = None,
              order: str = DEFAULT_ORDER) -> "ParallelDims":
        """Initialise communication if the job has more than one rank, then build the groups.

        The world size is read from the launcher (``msrun`` sets ``MS_WORKER_NUM``); a plain
        ``python`` process is a world of one and needs no ``init()``.
        """
        from mcore import distributed_env

        world_size, rank = distributed_env.init_if_needed()
        layout = RankLayout(world=world_size, tp=tp, cp=cp, ep=ep, pp=pp, etp=etp, order=order)
        return cls.from_layout(layout, rank, create_groups=world_size > 1)

    @classmethod
    def single(cls) -> "ParallelDims":
        """A world of one rank: all groups have size one."""
        return cls.from_layout(RankLayout(world=1), 0)


def _single(kind: str):
    return field(default_factory=lambda: ProcessGroup.single(kind))


@dataclass(frozen=True)
class ModelGroups:
    """The process groups a model's layers use, as one object passed down the model stack
    (``GPTModel -> TransformerBlock -> TransformerLayer -> attention / MLP / MoELayer``).

    ``tp``: tensor parallel (attention heads, MLP hidden, vocabulary); ``cp``: context parallel
    (``SelfAttention`` exchanges keys and values over it; the caller feeds each rank its part
    of the sequence, ``mcore.context_parallel``); ``ep``: ranks that split the routed experts of a MoE layer
    (tokens are exchanged over it); ``etp``: ranks that split each expert's weights. Every
    field defaults to a size-one group, so ``ModelGroups()`` is a single-process model and
    ``ModelGroups(tp=group)`` only tensor parallel. A new axis is one new field here.
    """

    tp: ProcessGroup = _single("tp")
    cp: ProcessGroup = _single("cp")
    ep: ProcessGroup = _single("ep")
    etp: ProcessGroup = _single("etp")

    @classmethod
    def single(cls) -> "ModelGroups":
        """Every group of size one: a plain single-process model."""
        return cls()

    @classmethod
    def from_dims(cls, dims: ParallelDims) -> "ModelGroups":
        """This rank's groups of ``dims`` (``dims.tp``, ``dims.cp``, ``dims.ep``, ``dims.etp``)."""
        return cls(tp=dims.tp, cp=dims.cp, ep=dims.ep, etp=dims.etp)

    @classmethod
    def resolve(cls, groups: "ModelGroups | None", tp_group: ProcessGroup | None,
                where: str) -> "ModelGroups":
        """``groups``, or the compatibility form ``tp_group=`` as ``ModelGroups(tp=tp_group)``,
        or single groups; ``ValueError`` naming ``where`` if both are given."""
        if groups is not None and tp_group is not None:
            raise ValueError(f"{where}: pass groups= or tp_group=, not both")
        if groups is not None:
            return groups
        return cls(tp=tp_group) if tp_group is not None else cls()
