"""Several ``training/pretrain.py`` runs in ONE msrun launch (a launch costs 10-35 s; the runs
here differ only in their overrides and reuse the communication groups, which MindSpore keeps
by name).

    msrun ... tests/training/cp_worker.py key=value ... ++ key=value ... [++ ...]

Each ``++``-separated group of overrides is one run (``training.pretrain.run``, the same loop
the script runs), in order, each in its own ``logging.output_dir``. Exceptions propagate (a
failed run fails the launch)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str]) -> None:
    from training.pretrain import parse_args, run

    runs, current = [], []
    for arg in argv:
        if arg == "++":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    runs.append(current)
    for overrides in runs:
        run(parse_args(overrides))


if __name__ == "__main__":
    main(sys.argv[1:])
