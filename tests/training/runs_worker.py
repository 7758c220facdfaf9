"""Several training runs in ONE msrun launch: a launch costs 10-35 s of process start-up,
imports, cluster formation and teardown, the runs here differ only in their overrides and reuse
the communication groups, which MindSpore keeps by name.

    msrun ... tests/training/runs_worker.py ENTRY key=value ... ++ key=value ... [++ ...]

``ENTRY`` is ``pretrain`` or ``finetune``: each ``++``-separated group of arguments is one run of
``training.<ENTRY>.main(group)`` (what ``python training/<ENTRY>.py group`` does), in order,
each in its own ``logging.output_dir``; a later run may load an earlier one's checkpoint. A run
that fails (an exception, or exit status 2 for bad input) fails the launch, and the runs after
it do not start.
From a test, ``launch_runs`` runs a list of runs in one launch and ``launch_by_rank_count``
a table of runs in one launch per rank count."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ENTRIES = ("pretrain", "finetune")


def launch_runs(tmp: Path, entry: str, runs: list[list[str]], workers: int,
                timeout: float = 400, log_dir: str = "logs") -> str:
    """Run ``runs`` (override lists) in one msrun launch of ``workers`` ranks from ``tmp``; return
    the workers' logs (every run's output); assert the launch exited 0."""
    from tests.msrun_util import msrun_command, run_msrun, worker_logs

    args = [entry]
    for overrides in runs:
        args += [*overrides, "++"]
    out = run_msrun(msrun_command(__file__, args[:-1], workers=workers, log_dir=log_dir),
                    cwd=tmp, timeout=timeout)
    logs = worker_logs(tmp / log_dir)
    assert out.returncode == 0, out.stdout[-2000:] + logs[-6000:]
    return logs


def launch_by_rank_count(tmp: Path, entry: str, runs: dict[str, tuple[int, list[str]]],
                         timeout: float = 900) -> None:
    """``runs``: name -> (ranks, arguments). One ``launch_runs`` per rank count, fewest ranks
    first, the runs of a count in table order (logs in ``tmp/logs_<N>ranks``)."""
    for ranks in sorted({n for n, _ in runs.values()}):
        group = [args for n, args in runs.values() if n == ranks]
        launch_runs(tmp, entry, group, ranks, timeout=timeout, log_dir=f"logs_{ranks}ranks")


def main(argv: list[str]) -> None:
    entry, *rest = argv
    if entry not in ENTRIES:
        raise SystemExit(f"runs_worker.py: ENTRY must be one of {ENTRIES}, got {entry!r}")
    module = importlib.import_module(f"training.{entry}")
    runs, current = [], []  # argument groups
    for arg in rest:
        if arg == "++":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    runs.append(current)
    for args in runs:
        status = module.main(args)
        if status:
            raise SystemExit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
