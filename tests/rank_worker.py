"""Entry point of one process started by ``tests.multirank.run_ranks``.

``python -m tests.rank_worker --scheduler`` runs the scheduler role;
``python -m tests.rank_worker module:function WORKDIR [ARGS...]`` runs one worker rank, calls
``function(ctx)`` and writes ``WORKDIR/result_<rank>.pkl`` (checks, values, traceback).

From start-up to exit a worker also keeps ``WORKDIR/heartbeat_<rank>`` fresh: every second a
daemon thread writes the time and the line the main thread is on. The harness shows it when a
job hangs (where each rank is stuck). The thread cannot run while C code holds the GIL (a
MindSpore graph compile holds it for up to ~4 s at a time, measured), so a stale heartbeat
means "inside C", not "dead"; the harness judges busy vs stuck by CPU time instead
(``tests.rank_activity``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
import threading
import time
import traceback
from pathlib import Path

HEARTBEAT_SECONDS = 1.0


class RankContext:
    """What a worker function receives: its rank, the world size, and check / report hooks."""

    def __init__(self, rank: int, world: int, workdir: Path, args: list[str]):
        self.rank, self.world, self.workdir, self.args = rank, world, workdir, args
        self.checks: dict[str, str | None] = {}
        self.values: dict = {}
        self._progress = workdir / f"progress_{rank}"

    def _tick(self, what: str) -> None:
        self._progress.write_text(what)
        print(f"[rank {self.rank}] {what}", flush=True)

    @contextlib.contextmanager
    def check(self, name: str):
        """Record one named check; assertion failures are recorded, other errors re-raised."""
        if name in self.checks:
            raise ValueError(f"check {name!r} recorded twice")
        self._tick(f"start {name}")
        try:
            yield
        except AssertionError as e:
            self.checks[name] = f"{type(e).__name__}: {e}"
            self._tick(f"FAILED {name}: {e}")
            return
        except BaseException:
            self.checks[name] = traceback.format_exc()
            raise
        self.checks[name] = None
        self._tick(f"ok {name}")

    def report(self, key: str, value) -> None:
        self.values[key] = value

    def save(self, trace: str | None = None) -> None:
        out = {"checks": self.checks, "values": self.values, "traceback": trace}
        tmp = self.workdir / f"result_{self.rank}.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(out, f)
        tmp.rename(self.workdir / f"result_{self.rank}.pkl")


def start_heartbeat(path: Path, every: float = HEARTBEAT_SECONDS) -> threading.Thread:
    """Start a daemon thread that writes ``"<unix time> <file>:<line> in <function>"`` (where the
    main thread is) to ``path`` every ``every`` seconds, atomically."""
    main_id = threading.main_thread().ident

    def beat():
        tmp = path.with_name(path.name + ".tmp")
        while True:
            frame = sys._current_frames().get(main_id)
            where = (f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
                     if frame is not None else "(main thread gone)")
            try:
                tmp.write_text(f"{time.time():.1f} {where}")
                tmp.replace(path)
            except OSError:  # the harness removed the directory: nobody is watching
                return
            time.sleep(every)

    thread = threading.Thread(target=beat, name="rank-heartbeat", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    from mcore.distributed_env import init_if_needed

    if argv[0] == "--scheduler":
        init_if_needed()
        return 0
    target, workdir, args = argv[0], Path(argv[1]), argv[2:]
    start_heartbeat(workdir / f"heartbeat_{os.environ.get('MS_NODE_ID', 'unknown')}")
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    world, rank = init_if_needed()
    ctx = RankContext(rank, world, workdir, args)
    ctx._tick("initialised")
    try:
        func(ctx)
    except BaseException:
        trace = traceback.format_exc()
        ctx.save(trace)
        print(trace, file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip MindSpore's exit handlers: after a failure they wait ~40 s for peers to unregister.
        os._exit(1)
    ctx.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
