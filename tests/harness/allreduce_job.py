"""A script for msrun: every rank all-reduces (rank + 1) over the world and checks the sum.

``--die-rank R`` makes rank R raise after init, ``--kill-rank R`` makes it SIGKILL itself (after
printing ``KILLED_AT <unix time>``), to test that the job then ends non-zero and how fast.
``--freeze-rank R --freeze-seconds S`` stops rank R (SIGSTOP, so not even MindSpore's C++
heartbeat thread runs) for S seconds before the all-reduce (every rank waits S + 2 s), as an
overloaded machine can.
Prints ``ALLREDUCE_OK rank=<r> world=<n> sum=<s>`` on success.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--die-rank", type=int, default=-1)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--freeze-rank", type=int, default=-1)
    parser.add_argument("--freeze-seconds", type=float, default=0.0)
    args = parser.parse_args()

    import mindspore as ms
    import numpy as np

    from mcore import comm
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build()
    rank, world = dims.global_rank, dims.world_size
    if rank == args.die_rank:
        raise RuntimeError(f"rank {rank} dies on purpose")
    if rank == args.kill_rank:
        import signal
        import time

        print(f"KILLED_AT {time.time():.2f}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == args.freeze_rank:
        import subprocess

        pid = os.getpid()
        subprocess.run(["sh", "-c", f"(kill -STOP {pid}; sleep {args.freeze_seconds}; "
                                    f"kill -CONT {pid}) >/dev/null 2>&1 &"], check=True)
    if args.freeze_rank >= 0:  # every rank waits out the freeze: a collective would time out
        import time

        time.sleep(args.freeze_seconds + 2)
    total = comm.all_reduce(ms.Tensor(np.array([rank + 1.0], np.float32)), dims.world)
    expected = world * (world + 1) / 2
    got = float(total.asnumpy()[0])
    if got != expected:
        raise SystemExit(f"rank {rank}: all_reduce gave {got}, expected {expected}")
    print(f"ALLREDUCE_OK rank={rank} world={world} sum={got:g}", flush=True)


if __name__ == "__main__":
    main()
