"""The collectives timed by ``bench_comm.py``, shared by the timed rank and its peer.

Each op takes a 1 MiB float32 input per rank. ``CONTROL`` is the op id sent (untimed) before
each call so that the peer rank makes the same call; ``STOP`` ends the peer.
"""
from __future__ import annotations

PAYLOAD_FLOATS = 256 * 1024  # 1 MiB of float32
STOP = -1.0


def ops_table():
    """name -> fn(x, group); the order is the op id."""
    from mcore import comm

    return [
        ("all_reduce", comm.all_reduce),
        ("all_gather", comm.all_gather),
        ("all_to_all", comm.all_to_all),
        ("reduce_scatter", comm.reduce_scatter),
        ("broadcast", comm.broadcast),
    ]


def payload(rank: int):
    import mindspore as ms
    import numpy as np

    return ms.Tensor(np.full((PAYLOAD_FLOATS // 256, 256), rank + 1.0, np.float32))


def next_command(group, command: float) -> float:
    """Rank 0 says which op comes next (or STOP); every rank returns it. Untimed control."""
    import mindspore as ms
    import numpy as np

    from mcore import comm

    mine = command if group.rank == 0 else 0.0
    return float(comm.all_reduce(ms.Tensor(np.array([mine], np.float32)), group).asnumpy()[0])


def serve(group) -> None:
    """Peer loop: wait for a command, run that op, until STOP."""
    table = ops_table()
    x = payload(group.rank)
    while (command := next_command(group, 0.0)) != STOP:
        table[int(command)][1](x, group).asnumpy()
