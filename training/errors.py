"""User errors and the one place that turns them into ``<kind> error: <message>`` + exit 2.

A user error is bad input the user can fix (a config key, a file, a checkpoint), not a bug:

    ConfigError         training.config         a key, value, size or path   "config error: ..."
    DataError           here                    corpus, tokenizer, dataset   "data error: ..."
    CheckpointError     training.checkpointing  an unusable checkpoint       "checkpoint error: ..."
    LoadError           models                  a Hugging Face directory     "load error: ..."
    FloatingPointError  (builtin)               a loss that became NaN/Inf   "numerical error: ..."

Each message is one line naming the key or file. The entry points (``training/pretrain.py``,
``evaluate.py``, ``generate.py``) run their work inside ``exit_on_user_error()``, which prints
that line on stderr (no traceback) and exits with status 2; any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager


class DataError(ValueError):
    """A corpus, tokenizer or dataset that cannot be used; the message names the key or file."""


def error_kind(exc: BaseException) -> str | None:
    """``"config"``, ``"data"``, ``"checkpoint"``, ``"load"`` or ``"numerical"`` for a user
    error, None for anything else."""
    from training.checkpointing import CheckpointError
    from training.config import ConfigError

    kinds = [(ConfigError, "config"), (DataError, "data"), (CheckpointError, "checkpoint")]
    loaded = sys.modules.get("models.errors")  # a LoadError exists only once models is imported
    if loaded is not None:
        kinds.append((loaded.LoadError, "load"))
    kinds.append((FloatingPointError, "numerical"))
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), None)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a ``KeyError``'s without the added quotes)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


@contextmanager
def exit_on_user_error():
    """Run the body; a user error prints ``<kind> error: <message>`` on stderr and exits 2."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
        kind = error_kind(exc)
        if kind is None:
            raise
        print(f"{kind} error: {one_line(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
