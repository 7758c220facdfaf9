"""Point-to-point exchange between two ranks, for pipeline neighbours.

MindSpore 2.10 has no Send / Receive kernel on CPU (and ``mint.distributed.send`` only works in
PyNative after a cache work-around), so a transfer is a SUM all-reduce over a two-rank group, on
every device (there is no native branch here):
each rank writes what it sends into its own slot of a zero buffer and reads the peer's slot.
One call therefore moves data in both directions at once (Megatron's
``send_forward_recv_backward``), and both ranks must make the matching call.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mcore.comm.collectives import _sum
from mcore.parallel_state import ProcessGroup


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def exchange(send, recv_shape, pair: ProcessGroup, dtype=ms.float32):
    """Send ``send`` (or ``None``) to the other rank of ``pair`` and receive a tensor of
    ``recv_shape`` (or ``None``) from it. Returns the received tensor or ``None``.

    Both ranks call ``exchange`` with mirrored arguments: what one sends, the other expects.
    """
    if pair.size != 2:
        raise ValueError(f"exchange: needs a two-rank group, got {pair.kind} of size {pair.size}")
    if send is not None:
        dtype = send.dtype
    send_n = 0 if send is None else _numel(send.shape)
    recv_n = 0 if recv_shape is None else _numel(recv_shape)
    if send_n == 0 and recv_n == 0:
        return None
    # Slot order follows group rank: [rank-0 message, rank-1 message].
    slots = [send.reshape(-1) if send_n else None, ops.zeros((recv_n,), dtype) if recv_n else None]
    if pair.rank == 1:
        slots.reverse()
    total = _sum(ops.cat([t for t in slots if t is not None]), pair)
    out = total[send_n:] if pair.rank == 0 else total[:recv_n]
    return out.reshape(tuple(recv_shape)) if recv_n else None


def send(x, pair: ProcessGroup) -> None:
    """Send ``x`` to the other rank of ``pair`` (which calls ``recv`` with ``x.shape``)."""
    exchange(x, None, pair, x.dtype)


def recv(shape, pair: ProcessGroup, dtype=ms.float32):
    """Receive a tensor of ``shape`` from the other rank of ``pair`` (which calls ``send``)."""
    return exchange(None, shape, pair, dtype)
