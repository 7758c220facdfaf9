"""Run under msrun: build the parallel layout, then run each portable collective once.

From the repository root (msrun runs in a scratch directory, where MindSpore writes its
``rank_N/`` folders, and starts its workers with the ``python`` on ``PATH``)::

    (repo=$PWD; cd "$(mktemp -d)" && PATH="$repo/.venv/bin:$PATH" timeout 300 msrun \
        --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True \
        --cluster_time_out=60 --log_dir=logs "$repo/examples/collectives_demo.py")

Any even number of ranks works (tp=2, the rest is dp).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

from mcore import comm  # noqa: E402
from mcore.parallel_state import ParallelDims  # noqa: E402


def main():
    dims = ParallelDims.build(tp=2)
    rank = dims.global_rank
    x = ms.Tensor(np.full((2, 2), rank + 1.0, np.float32))
    lines = {
        "all_reduce(sum)": comm.all_reduce(x, dims.tp),
        "all_reduce(max)": comm.all_reduce(x, dims.tp, "max"),
        "all_gather(dim=1)": comm.all_gather(x, dims.tp, dim=1),
        "reduce_scatter(dim=0)": comm.reduce_scatter(x, dims.tp, dim=0),
        "all_to_all(0->1)": comm.all_to_all(x, dims.tp, 0, 1),
        "broadcast(src=1)": comm.broadcast(x, dims.tp, src=1),
    }
    print(f"rank {rank}/{dims.world_size}: tp group {dims.tp.ranks}, dp group {dims.dp.ranks}")
    for name, value in lines.items():
        print(f"rank {rank} {name:>22}: {value.asnumpy().tolist()}", flush=True)


if __name__ == "__main__":
    main()
