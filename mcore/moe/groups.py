"""MoEGroups: the process groups a mixture-of-experts layer uses, as one object."""
from __future__ import annotations

from dataclasses import dataclass

from mcore.parallel_state import ParallelDims, ProcessGroup


@dataclass(frozen=True)
class MoEGroups:
    """``ep``: ranks that split the experts among themselves (tokens are exchanged over it);
    ``etp``: ranks that split each expert's weights (expert tensor parallel); ``tp``: the dense
    tensor-parallel group of the surrounding layer. Only ``ep`` > 1 is implemented so far."""

    ep: ProcessGroup
    etp: ProcessGroup
    tp: ProcessGroup

    @classmethod
    def from_dims(cls, dims: ParallelDims) -> "MoEGroups":
        return cls(ep=dims.ep, etp=dims.etp, tp=dims.tp)

    @classmethod
    def single(cls) -> "MoEGroups":
        """Every group of size one: a plain single-process layer."""
        return cls(ep=ProcessGroup.single("ep"), etp=ProcessGroup.single("etp"),
                   tp=ProcessGroup.single("tp"))

    def check_supported(self) -> None:
        for name in ("etp", "tp"):
            size = getattr(self, name).size
            if size > 1:
                raise NotImplementedError(f"MoELayer: {name} size {size} > 1 is not supported "
                                          "yet (only ep)")
