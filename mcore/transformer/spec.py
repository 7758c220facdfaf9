"""ModuleSpec and build_module: a layer is described by a tree of specs, not by subclassing.

A ``ModuleSpec`` names a class (or factory), fixed keyword arguments (``params``) and the specs
of its submodules (``submodules``, any object the class understands, usually a small dataclass).
``build_module(spec, *args, **kwargs)`` instantiates it, passing ``submodules=`` when given::

    spec = ModuleSpec(TransformerLayer, submodules=TransformerLayerSubmodules(
        input_norm=ModuleSpec(RMSNorm), self_attention=ModuleSpec(SelfAttention, ...), ...))
    layer = build_module(spec, config, layer_number=0, groups=ModelGroups(tp=group))

Swapping a submodule (a custom attention, another norm) means replacing one node of the tree;
``spec.replace(...)`` / ``dataclasses.replace`` on the submodules make that a one-liner.
A plain class (not a spec) is also accepted and built with the given arguments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mindspore import nn


@dataclass(frozen=True)
class ModuleSpec:
    """What to build: ``module`` (a class or callable), extra ``params`` and ``submodules``."""

    module: Any
    params: dict = field(default_factory=dict)
    submodules: Any = None

    def replace(self, **changes) -> "ModuleSpec":
        """A copy with some fields changed (``spec.replace(module=MyAttention)``)."""
        return dataclasses.replace(self, **changes)


class IdentityOp(nn.Cell):
    """Returns its first input; accepts and ignores any constructor arguments.

    The placeholder for an absent optional submodule (e.g. no QK-norm, no sandwich norm).
    """

    def __init__(self, *args, **kwargs):
        super().__init__()

    def construct(self, x):
        return x


def build_module(spec, *args, **kwargs):
    """Instantiate ``spec`` (a ``ModuleSpec``, a class, or None -> None).

    ``spec.params`` are merged over ``kwargs`` (the spec wins); ``spec.submodules`` is passed as
    ``submodules=`` when not None. Errors name the module that failed to build.
    """
    if spec is None:
        return None
    if not isinstance(spec, ModuleSpec):
        return spec(*args, **kwargs)
    merged = {**kwargs, **spec.params}
    if spec.submodules is not None:
        merged["submodules"] = spec.submodules
    try:
        return spec.module(*args, **merged)
    except TypeError as e:
        name = getattr(spec.module, "__name__", repr(spec.module))
        raise TypeError(f"build_module({name}): {e}") from e
