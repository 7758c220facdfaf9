"""Collectives for ``mcore``: plain forms (``collectives``), differentiable forms (``autograd``)
and pipeline point-to-point (``p2p``). All take a ``ProcessGroup`` from ``ParallelDims``."""
from mcore.comm.autograd import (DifferentiableAllGather, DifferentiableAllReduceSum,
                                 DifferentiableAllToAll, DifferentiableIdentity,
                                 DifferentiableReduceScatter, DifferentiableSplit)
from mcore.comm.collectives import (all_gather, all_reduce, all_to_all, all_to_all_uneven,
                                    barrier, broadcast, narrow, reduce_scatter)
from mcore.comm.p2p import exchange, recv, send

__all__ = [
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_uneven", "broadcast",
    "barrier", "narrow", "exchange", "send", "recv", "DifferentiableIdentity",
    "DifferentiableAllReduceSum", "DifferentiableAllGather", "DifferentiableReduceScatter",
    "DifferentiableSplit", "DifferentiableAllToAll",
]
