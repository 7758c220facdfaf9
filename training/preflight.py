"""Checks of a run's paths before any heavy work (no MindSpore, no model, no data read).

``check_paths(cfg)`` raises the user error of the first path that cannot work, naming its
key: ``data.corpus`` / ``data.data_prefix`` that do not exist (``DataError``);
``checkpoint.load`` that is neither ``none``, ``auto`` nor a checkpoint directory
(``CheckpointError`` listing the accepted values); ``model.hf_path`` without a
``config.json``, ``logging.output_dir``, ``checkpoint.dir`` or ``data.cache_dir`` that cannot
be created or written (``ConfigError``). ``data.tokenizer`` is not checked here:
``training.pretrain.check_tokenizer_file`` refuses a missing file, one that is not a
tokenizer and one larger than ``model.vocab_size`` when the config is parsed, before these
checks run (``ConfigError``).
"""
from __future__ import annotations

import os
from pathlib import Path

from training.errors import DataError

LOAD_VALUES = "'none', 'auto' (newest valid checkpoint) or a step_NNNNNN checkpoint directory"


def check_writable_dir(key: str, value: str) -> None:
    """``ConfigError`` unless directory ``value`` exists and is writable, or can be created."""
    from training.config import ConfigError

    path = Path(value)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}='{value}': '{probe}' is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}='{value}': directory '{probe}' is not writable")


def check_data(cfg) -> None:
    """``DataError`` naming the ``data`` key whose file or directory does not exist
    (``data.tokenizer``: see the module docstring)."""
    d = cfg.data
    if d.data_prefix is not None:
        for suffix in (".bin", ".idx"):
            if not Path(d.data_prefix + suffix).is_file():
                raise DataError(f"data.data_prefix='{d.data_prefix}': no such file "
                                f"'{d.data_prefix}{suffix}'")
        if d.tokenizer is None:
            raise DataError("data.data_prefix is set but data.tokenizer is not: give the "
                            "tokenizer.json the dataset was built with")
    elif d.corpus != "stdlib" and not Path(d.corpus).exists():
        raise DataError(f"data.corpus='{d.corpus}': no such file or directory (use 'stdlib', a "
                        "text file or a directory of text files)")


def check_load(load: str) -> None:
    """``CheckpointError`` unless ``checkpoint.load`` is ``none``, ``auto`` or a directory with
    a readable ``meta.json``."""
    from training.checkpointing import CheckpointError, read_meta

    if load in ("none", "auto"):
        return
    if not Path(load).is_dir():
        raise CheckpointError(f"checkpoint.load='{load}': no such directory (accepted: "
                              f"{LOAD_VALUES})")
    try:
        read_meta(load)
    except CheckpointError as exc:  # name the key as well as the file
        raise CheckpointError(f"checkpoint.load='{load}': {exc}") from None


def check_paths(cfg) -> None:
    """All of the above for ``cfg`` (see the module docstring)."""
    from training.config import ConfigError

    check_data(cfg)
    hf_path = cfg.model.hf_path
    if hf_path and not (Path(hf_path) / "config.json").is_file():
        raise ConfigError(f"model.hf_path='{hf_path}': no config.json there (not a Hugging Face "
                          "checkpoint directory)")
    check_load(cfg.checkpoint.load)
    check_writable_dir("logging.output_dir", cfg.logging.output_dir)
    if cfg.checkpoint.dir is not None:
        check_writable_dir("checkpoint.dir", cfg.checkpoint.dir)
    if cfg.data.data_prefix is None:
        check_writable_dir("data.cache_dir", cfg.data.cache_dir)
