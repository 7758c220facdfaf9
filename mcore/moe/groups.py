"""The process groups of a mixture-of-experts layer: the model's ``ModelGroups``.

``MoEGroups`` is the same class as ``mcore.parallel_state.ModelGroups`` (kept as a name for
the MoE library); ``check_supported`` states which of its axes ``MoELayer`` implements.
"""
from __future__ import annotations

from mcore.parallel_state import ModelGroups

MoEGroups = ModelGroups


def check_supported(groups: ModelGroups) -> None:
    """``NotImplementedError`` naming the axis if ``groups`` splits what MoE cannot yet: only
    ``ep`` may be > 1 (``etp`` and the dense ``tp`` of the surrounding layer must be 1)."""
    for name in ("etp", "tp"):
        size = getattr(groups, name).size
        if size > 1:
            raise NotImplementedError(f"MoELayer: {name} size {size} > 1 is not supported "
                                      "yet (only ep)")
