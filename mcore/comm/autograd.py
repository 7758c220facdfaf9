"""Differentiable collectives: Cells whose ``bprop`` is the adjoint collective.

MindSpore's built-in backward of ``AllReduce`` is another all-reduce, which is wrong for
Megatron's f/g regions, so every form here defines its own backward (a Cell ``bprop`` works in
PyNative, ``mindspore.jit`` and GRAPH_MODE). The pairs, forward <-> backward:

================================  ======================  ===========================
Cell                              forward                 backward
================================  ======================  ===========================
``DifferentiableIdentity``        identity                all-reduce SUM
``DifferentiableAllReduceSum``    all-reduce SUM          identity
``DifferentiableAllGather``       all-gather(dim)         reduce-scatter(dim)
``DifferentiableReduceScatter``   reduce-scatter(dim)     all-gather(dim)
``DifferentiableSplit``           keep own slice(dim)     all-gather(dim)
``DifferentiableAllToAll``        all-to-all(s -> c)      all-to-all(c -> s)
================================  ======================  ===========================

"Identity <-> all-reduce" is the f / g pair of tensor parallelism: the backward of a replicated
input sums the partial gradients of all ranks; the backward of a summed output is the
(replicated) output gradient itself. Each Cell is the identity on a group of size one.
"""
from __future__ import annotations

import types

from mindspore import nn, ops

from mcore.comm.collectives import _check_divisible, all_gather, all_reduce, all_to_all, narrow
from mcore.comm.collectives import all_to_all_from_gathered
from mcore.comm.collectives import reduce_scatter
from mcore.parallel_state import ProcessGroup


def backward_copy(fn):
    """A separate function object with ``fn``'s code, for use inside ``bprop`` methods.

    Under ``mindspore.jit`` (MindSpore 2.10), a Python function that contains an ``if``
    statement and is called both in a forward and in a ``bprop`` of the same graph fails to
    compile ("The func graph is empty"). Backward passes therefore call copies.
    """
    return types.FunctionType(fn.__code__, fn.__globals__, f"{fn.__name__}_bwd", fn.__defaults__,
                              fn.__closure__)


def all_to_all_bwd(x, group: ProcessGroup, split_dim: int = 0, concat_dim: int = 0):
    """``all_to_all`` for ``bprop`` methods. A ``backward_copy`` of ``all_to_all`` would still
    call the forward's ``all_gather`` (the graph compiler resolves the callee by its module
    name), which fails in GRAPH_MODE ("The func graph is empty"); so the composed all-gather is
    written out here, over the SUM all-reduce every path shares."""
    if group.size == 1:
        return x
    if group.native:
        return ops.AlltoAll(group.size, split_dim % x.ndim, concat_dim % x.ndim,
                            group=group.comm_name)(x)
    split_dim, concat_dim = split_dim % x.ndim, concat_dim % x.ndim
    one = ops.expand_dims(x, 0)  # [1, *x.shape]
    zeros = ops.zeros(one.shape, one.dtype)
    parts = []
    for i in range(group.size):
        parts.append(one if i == group.rank else zeros)
    gathered = all_reduce_bwd(ops.cat(parts, axis=0), group)  # [P_src, *x.shape]
    return all_to_all_from_gathered(gathered, x.shape, group, split_dim, concat_dim)


all_gather_bwd = backward_copy(all_gather)
all_reduce_bwd = backward_copy(all_reduce)
reduce_scatter_bwd = backward_copy(reduce_scatter)


class _GroupCell(nn.Cell):
    def __init__(self, group: ProcessGroup, dim: int = 0):
        super().__init__()
        self.group = group
        self.dim = dim


class DifferentiableIdentity(_GroupCell):
    """Forward: identity. Backward: all-reduce SUM of the gradient (Megatron's ``f``)."""

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (all_reduce_bwd(dout, self.group),)


class DifferentiableAllReduceSum(_GroupCell):
    """Forward: all-reduce SUM. Backward: identity (Megatron's ``g``)."""

    def construct(self, x):
        return all_reduce(x, self.group)

    def bprop(self, x, out, dout):
        return (dout,)


class DifferentiableAllGather(_GroupCell):
    """Forward: all-gather along ``dim`` ([n] -> [P*n]). Backward: reduce-scatter ([P*n] -> [n])."""

    def construct(self, x):
        return all_gather(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        return (reduce_scatter_bwd(dout, self.group, self.dim),)


class DifferentiableReduceScatter(_GroupCell):
    """Forward: reduce-scatter along ``dim`` ([P*n] -> [n]). Backward: all-gather ([n] -> [P*n])."""

    def construct(self, x):
        return reduce_scatter(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        return (all_gather_bwd(dout, self.group, self.dim),)


class DifferentiableSplit(_GroupCell):
    """Forward: keep this rank's 1/P slice along ``dim`` ([P*n] -> [n], no communication).
    Backward: all-gather the slice gradients ([n] -> [P*n])."""

    def construct(self, x):
        if self.group.size == 1:
            return x
        n = _check_divisible(x, self.group, self.dim, "split")
        return narrow(x, self.dim, self.group.rank * n, n)

    def bprop(self, x, out, dout):
        return (all_gather_bwd(dout, self.group, self.dim),)


class DifferentiableAllToAll(nn.Cell):
    """Forward: all-to-all splitting ``split_dim`` and concatenating ``concat_dim``.
    Backward: the reverse all-to-all (split ``concat_dim``, concatenate ``split_dim``)."""

    def __init__(self, group: ProcessGroup, split_dim: int = 0, concat_dim: int = 0):
        super().__init__()
        self.group = group
        self.split_dim = split_dim
        self.concat_dim = concat_dim

    def construct(self, x):
        return all_to_all(x, self.group, self.split_dim, self.concat_dim)

    def bprop(self, x, out, dout):
        return (all_to_all_bwd(dout, self.group, self.concat_dim, self.split_dim),)
