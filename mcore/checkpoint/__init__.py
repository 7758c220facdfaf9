"""Distributed checkpoints: every rank writes what it owns under global names with the offsets
of its shards, one ``meta.json`` describes them all, and any layout reads its slices back.

- ``layout``    ``ShardSpec`` / ``shard_spec``: where a local array sits in the global tensor
- ``metadata``  the format (``meta.json``), ``CheckpointError``, file hashing and verification
- ``save``      ``save_checkpoint`` (atomic: temp directory, metadata last, rename)
- ``load``      ``load_tensors`` (any layout's slices), ``load_global`` (whole tensors)
- ``store``     checkpoint directories: auto-resume choice, rotation, repair of interrupted saves
"""
from mcore.checkpoint.layout import Block, ShardSpec, shard_spec
from mcore.checkpoint.load import load_global, load_tensors
from mcore.checkpoint.metadata import CheckpointError, read_meta, verify_files
from mcore.checkpoint.save import Shard, first_nonfinite, save_checkpoint
from mcore.checkpoint.store import (find_latest_valid, list_checkpoints, remove_incomplete,
                                    resolve_load, rotate, scan, step_dir, step_dirs, why_invalid)

__all__ = ["Block", "ShardSpec", "shard_spec", "load_global", "load_tensors", "CheckpointError",
           "read_meta", "verify_files", "Shard", "first_nonfinite", "save_checkpoint",
           "find_latest_valid", "list_checkpoints", "remove_incomplete", "resolve_load", "rotate",
           "scan", "step_dir", "step_dirs", "why_invalid"]
