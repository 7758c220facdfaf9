"""Pipeline point-to-point: activations forward, their gradients backward, between neighbours.

Built on ``mcore.comm.p2p.exchange``: one SUM all-reduce over the two-rank group of this rank
and a neighbour (``dims.pp_next_pair`` / ``dims.pp_prev_pair``) moves data both ways at once.
So each call here is ONE collective, and **both neighbours must make the mirrored call in the
same order** (``send_forward`` on stage s <-> ``recv_forward`` on stage s + 1;
``send_forward_recv_backward`` <-> ``send_backward_recv_forward``). With pp = 2 the next and the
previous pair are the same group, so the calls in both directions share one sequence.
``mcore.pipeline_parallel.comm_plan`` derives and checks such sequences for whole schedules.

Shapes are known ahead (e.g. ``(micro_batch, seq / tp if sequence-parallel, hidden)``). When
they vary from one micro-batch to the next, call ``exchange_shapes`` first: a small exchange
of the shapes themselves, then the tensor exchange with the shape it returned.

Message order inside one exchange: the caller's ``sends`` and the peer's ``recv_shapes`` list
the same tensors in the same order (and vice versa); they are packed into one flat buffer.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mcore.comm.p2p import exchange
from mcore.parallel_state import ParallelDims, ProcessGroup

MAX_DIMS = 8  # rank of the largest tensor whose shape exchange_shapes can describe


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def communicate(sends, recv_shapes, pair: ProcessGroup, dtype=ms.float32) -> list:
    """Send the tensors ``sends`` to the other rank of ``pair`` and receive tensors of
    ``recv_shapes`` from it, in one exchange. Returns the received tensors (a list, possibly
    empty). All tensors travel as ``dtype``; received ones come back as ``dtype``."""
    sends, recv_shapes = list(sends), [tuple(s) for s in recv_shapes]
    if not sends and not recv_shapes:
        return []
    flat = None
    if sends:
        parts = [t.reshape(-1).astype(dtype) for t in sends]
        flat = parts[0] if len(parts) == 1 else ops.cat(parts)
    total = sum(_numel(s) for s in recv_shapes)
    got = exchange(flat, (total,) if recv_shapes else None, pair, dtype)
    out, start = [], 0
    for shape in recv_shapes:
        n = _numel(shape)
        out.append(got[start:start + n].reshape(shape))
        start += n
    return out


def exchange_shapes(shape, pair: ProcessGroup, expect: bool = True):
    """Tell the other rank of ``pair`` the shape of the tensor about to be sent (``shape``, or
    ``None`` if this rank sends nothing) and learn the shape it will send (``None`` if
    ``expect`` is False or it sends nothing). Both ranks call it; one 2 x 9-float exchange.

    Typical use with variable sequence lengths: ``s = exchange_shapes(out.shape, next_pair)``
    on stage s and ``s = exchange_shapes(None, prev_pair)`` on stage s + 1, then the tensor
    exchange with that shape."""
    header = [0.0] * (MAX_DIMS + 1)
    if shape is not None:
        if len(shape) > MAX_DIMS:
            raise ValueError(f"exchange_shapes: tensor rank {len(shape)} > {MAX_DIMS}")
        header[0] = float(len(shape))
        header[1:1 + len(shape)] = [float(s) for s in shape]
    got = exchange(ms.Tensor(header, ms.float32), (MAX_DIMS + 1,), pair)
    values = [int(round(v)) for v in got.asnumpy().tolist()]
    if not expect or values[0] == 0:
        return None
    return tuple(values[1:1 + values[0]])


# Megatron's names: stage s talks to s + 1 through ``dims.pp_next_pair`` and to s - 1 through
# ``dims.pp_prev_pair``. The first stage has no previous stage and the last no next one: calls
# that would cross those ends do nothing and return None (as in Megatron).

def send_forward(output, dims: ParallelDims) -> None:
    """Send this stage's output activation to the next stage (which calls ``recv_forward``)."""
    if not dims.is_last_stage:
        communicate([output], [], dims.pp_next_pair, output.dtype)


def recv_forward(shape, dims: ParallelDims, dtype=ms.float32):
    """Receive this stage's input activation from the previous stage (``send_forward``)."""
    if dims.is_first_stage:
        return None
    return communicate([], [shape], dims.pp_prev_pair, dtype)[0]


def send_backward(input_grad, dims: ParallelDims) -> None:
    """Send the gradient of this stage's input to the previous stage (``recv_backward``)."""
    if not dims.is_first_stage:
        communicate([input_grad], [], dims.pp_prev_pair, input_grad.dtype)


def recv_backward(shape, dims: ParallelDims, dtype=ms.float32):
    """Receive the gradient of this stage's output from the next stage (``send_backward``)."""
    if dims.is_last_stage:
        return None
    return communicate([], [shape], dims.pp_next_pair, dtype)[0]


def send_forward_recv_backward(output, shape, dims: ParallelDims):
    """One exchange with the next stage: send ``output``, receive the gradient of an earlier
    output (shape ``shape``). Mirror: ``send_backward_recv_forward`` on the next stage."""
    if dims.is_last_stage:
        return None
    return communicate([output], [shape], dims.pp_next_pair, output.dtype)[0]


def send_backward_recv_forward(input_grad, shape, dims: ParallelDims):
    """One exchange with the previous stage: send ``input_grad``, receive the next input
    activation (shape ``shape``). Mirror: ``send_forward_recv_backward`` on the previous stage."""
    if dims.is_first_stage:
        return None
    return communicate([input_grad], [shape], dims.pp_prev_pair, input_grad.dtype)[0]
