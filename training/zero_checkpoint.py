"""Optimizer state of checkpoints written with or without the distributed optimizer (ZeRO-1).

A rank of a non-distributed run saves whole moments (``adam_m.<name>`` / ``adam_v.<name>``, the
parameter's shape). With ``optimizer.distributed`` each rank saves only its pieces
(``DistributedAdamW.shard_state``): for every parameter with elements in its shard,
``adam_m.<name>`` / ``adam_v.<name>`` (1-D, the piece) and ``shard.<name>`` = int64
``[param_offset, length, *global shape]`` (the piece holds elements ``[param_offset,
param_offset + length)`` of the row-major flattened parameter), and the checkpoint's meta says
``"distributed": true`` under ``"optimizer"``. Weights are saved whole by every rank either way.

``load_optimizer_state`` gives a resuming rank whole moments whichever way they were saved: a
sharded checkpoint is assembled from the files of the rank's data-parallel peers (each verified
against ``meta.json``: size and SHA-256), so a distributed run resumes a non-distributed
checkpoint and the reverse, and a distributed run may change ``optimizer.bucket_size``; the
distributed optimizer then keeps its own shard (``DistributedAdamW.load_full_moments``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training.checkpointing import CheckpointError, read_meta, verify_files


def saved_sharded(path) -> bool:
    """Whether the checkpoint in ``path`` was written by the distributed optimizer."""
    return bool(read_meta(path)["meta"].get("optimizer", {}).get("distributed", False))


def assemble(pieces_by_file: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Whole ``adam_m.<name>`` / ``adam_v.<name>`` arrays from the sharded optimizer files of
    one data-parallel group (file name -> its tensors). Raises ``CheckpointError`` naming the
    file or parameter when a descriptor is malformed, pieces overlap, or a parameter is not
    covered exactly."""
    full, covered, shapes = {}, {}, {}
    for fname, tensors in pieces_by_file.items():
        for key, desc in tensors.items():
            if not key.startswith("shard."):
                continue
            name = key[len("shard."):]
            desc = [int(x) for x in np.asarray(desc).reshape(-1)]
            if len(desc) < 2:
                raise CheckpointError(f"checkpoint file '{fname}': tensor '{key}' is not "
                                      "[offset, length, *shape]")
            offset, length, shape = desc[0], desc[1], tuple(desc[2:])
            if shapes.setdefault(name, shape) != shape:
                raise CheckpointError(f"checkpoint file '{fname}': parameter '{name}' has global "
                                      f"shape {shape} here, {shapes[name]} in another file")
            numel = int(np.prod(shape, dtype=np.int64))
            if offset < 0 or length < 0 or offset + length > numel:
                raise CheckpointError(f"checkpoint file '{fname}': piece [{offset}, "
                                      f"{offset + length}) of '{name}' is outside its {numel} "
                                      "elements")
            mask = covered.setdefault(name, np.zeros(numel, bool))
            if mask[offset:offset + length].any():
                raise CheckpointError(f"checkpoint file '{fname}': piece of '{name}' overlaps "
                                      "another file's")
            mask[offset:offset + length] = True
            for kind in ("m", "v"):
                piece = tensors.get(f"adam_{kind}.{name}")
                if piece is None or piece.size != length:
                    raise CheckpointError(f"checkpoint file '{fname}': 'adam_{kind}.{name}' is "
                                          f"missing or not {length} elements long")
                flat = full.setdefault(f"adam_{kind}.{name}", np.zeros(numel, np.float32))
                flat[offset:offset + length] = piece.reshape(-1)
    for name, mask in covered.items():
        if not mask.all():
            raise CheckpointError(f"sharded optimizer state of '{name}' covers {int(mask.sum())} "
                                  f"of its {mask.size} elements (files of a data-parallel peer "
                                  "missing?)")
    return {k: v.reshape(shapes[k.split(".", 1)[1]]) for k, v in full.items()}


def load_optimizer_state(path, own: dict, dp_ranks, expected: dict[str, tuple]) -> dict:
    """Whole moments for this rank from the checkpoint in ``path``: ``own`` (this rank's
    optimizer tensors, as ``load_checkpoint`` returned them) when they were saved whole, else
    assembled from the optimizer files of ``dp_ranks`` (global ranks of this rank's
    data-parallel group). Checked against ``expected`` (name -> shape; ``CheckpointError``)."""
    path = Path(path)
    state = own
    if saved_sharded(path):
        meta = read_meta(path)
        from safetensors.numpy import load_file

        files = {}
        for r in dp_ranks:
            name = f"optim_rank{r}.safetensors"
            verify_files(path, meta, names=[name])
            files[str(path / name)] = load_file(str(path / name))
        state = assemble(files)
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"checkpoint '{path}' has no optimizer tensor '{name}' (saved "
                                  "with another parallel layout or model?)")
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint '{path}': optimizer tensor '{name}' has shape "
                                  f"{tuple(state[name].shape)}, expected {tuple(shape)}")
    return state
