"""A script for msrun: every rank all-reduces (rank + 1) over the world and checks the sum.

``--die-rank R`` makes rank R raise after init, to test that the job then ends non-zero.
Prints ``ALLREDUCE_OK rank=<r> world=<n> sum=<s>`` on success.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--die-rank", type=int, default=-1)
    args = parser.parse_args()

    import mindspore as ms
    import numpy as np

    from mcore import comm
    from mcore.parallel_state import ParallelDims

    dims = ParallelDims.build()
    rank, world = dims.global_rank, dims.world_size
    if rank == args.die_rank:
        raise RuntimeError(f"rank {rank} dies on purpose")
    total = comm.all_reduce(ms.Tensor(np.array([rank + 1.0], np.float32)), dims.world)
    expected = world * (world + 1) / 2
    got = float(total.asnumpy()[0])
    if got != expected:
        raise SystemExit(f"rank {rank}: all_reduce gave {got}, expected {expected}")
    print(f"ALLREDUCE_OK rank={rank} world={world} sum={got:g}", flush=True)


if __name__ == "__main__":
    main()
