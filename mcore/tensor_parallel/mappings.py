"""Megatron's f/g vocabulary: where activations enter and leave a tensor-parallel region.

Each mapping is a Cell (build it once with the group, call it in ``construct``; its ``bprop``
is the adjoint) and also a function with Megatron's name that builds the Cell and applies it
(fine in PyNative and inside ``mindspore.jit``). ``P`` = tp group size, ``r`` = this rank.
Tensor-parallel regions split the LAST dim (hidden); sequence-parallel regions split dim 1
(``SEQ_DIM``: activations are [b, s, h], batch first). On a group of size one every mapping is
the identity and never communicates.

==========================  ==========================================  ==========================
Cell                        forward                                     backward
==========================  ==========================================  ==========================
``CopyToTPRegion``          y = x                                       dx = sum_r dy_r
``ReduceFromTPRegion``      y = sum_r x_r                               dx = dy
``ScatterToTPRegion``       [.., h] -> own slice [.., h/P]              all-gather [.., h]
``GatherFromTPRegion``      all-gather [.., h/P] -> [.., h]             own slice of dy
``ScatterToSPRegion``       [b, s, h] -> own slice [b, s/P, h]          all-gather [b, s, h]
``GatherFromSPRegion``      all-gather [b, s/P, h] -> [b, s, h]         reduce-scatter (or slice)
``ReduceScatterToSPRegion`` sum_r x_r, own slice [b, s, h]->[b, s/P, h] all-gather [b, s, h]
==========================  ==========================================  ==========================

``GatherFromSPRegion(tensor_parallel_output_grad=True)`` reduce-scatters the gradient: use it
when the gathered activation feeds a tensor-parallel layer (each rank holds a partial gradient).
With ``False`` the gradient is already replicated and each rank keeps its slice.
"""
from __future__ import annotations

from mindspore import nn

from mcore.comm.autograd import (DifferentiableAllGather, DifferentiableAllReduceSum,
                                 DifferentiableIdentity, DifferentiableReduceScatter,
                                 DifferentiableSplit)
from mcore.comm.collectives import all_gather, narrow
from mcore.parallel_state import ProcessGroup

SEQ_DIM = 1
HIDDEN_DIM = -1


class GatherSliceBackward(nn.Cell):
    """Forward: all-gather along ``dim`` ([n] -> [P*n]). Backward: keep own slice of the
    (replicated) gradient ([P*n] -> [n]), no communication."""

    def __init__(self, group: ProcessGroup, dim: int):
        super().__init__()
        self.group = group
        self.dim = dim

    def construct(self, x):
        return all_gather(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        if self.group.size == 1:
            return (dout,)
        n = x.shape[self.dim]
        return (narrow(dout, self.dim, self.group.rank * n, n),)


class CopyToTPRegion(DifferentiableIdentity):
    """f: enter a tensor-parallel region with a replicated input. y = x; dx = all-reduce(dy)."""


class ReduceFromTPRegion(DifferentiableAllReduceSum):
    """g: leave a tensor-parallel region by summing partial outputs. y = all-reduce(x); dx = dy."""


class ScatterToTPRegion(DifferentiableSplit):
    """Keep this rank's slice of the last dim: [.., h] -> [.., h/P]; backward all-gathers."""

    def __init__(self, group: ProcessGroup):
        super().__init__(group, HIDDEN_DIM)


class GatherFromTPRegion(GatherSliceBackward):
    """All-gather the last dim: [.., h/P] -> [.., h]; backward keeps this rank's slice."""

    def __init__(self, group: ProcessGroup):
        super().__init__(group, HIDDEN_DIM)


class ScatterToSPRegion(DifferentiableSplit):
    """Keep this rank's slice of the sequence: [b, s, h] -> [b, s/P, h]; backward all-gathers."""

    def __init__(self, group: ProcessGroup):
        super().__init__(group, SEQ_DIM)


class GatherFromSPRegion(nn.Cell):
    """All-gather the sequence: [b, s/P, h] -> [b, s, h]. Backward: reduce-scatter (partial
    gradients, the default) or, with ``tensor_parallel_output_grad=False``, own slice."""

    def __init__(self, group: ProcessGroup, tensor_parallel_output_grad: bool = True):
        super().__init__()
        self.group = group
        if tensor_parallel_output_grad:
            self.inner = DifferentiableAllGather(group, SEQ_DIM)
        else:
            self.inner = GatherSliceBackward(group, SEQ_DIM)

    def construct(self, x):
        return self.inner(x)


class ReduceScatterToSPRegion(DifferentiableReduceScatter):
    """Sum partial outputs and keep this rank's sequence slice: [b, s, h] -> [b, s/P, h];
    backward all-gathers the gradient."""

    def __init__(self, group: ProcessGroup):
        super().__init__(group, SEQ_DIM)


# Megatron's functional names (each builds the Cell above and applies it).
def copy_to_tensor_model_parallel_region(x, group: ProcessGroup):
    return CopyToTPRegion(group)(x)


def reduce_from_tensor_model_parallel_region(x, group: ProcessGroup):
    return ReduceFromTPRegion(group)(x)


def scatter_to_tensor_model_parallel_region(x, group: ProcessGroup):
    return ScatterToTPRegion(group)(x)


def gather_from_tensor_model_parallel_region(x, group: ProcessGroup):
    return GatherFromTPRegion(group)(x)


def scatter_to_sequence_parallel_region(x, group: ProcessGroup):
    return ScatterToSPRegion(group)(x)


def gather_from_sequence_parallel_region(x, group: ProcessGroup,
                                         tensor_parallel_output_grad: bool = True):
    return GatherFromSPRegion(group, tensor_parallel_output_grad)(x)


def reduce_scatter_to_sequence_parallel_region(x, group: ProcessGroup):
    return ReduceScatterToSPRegion(group)(x)
