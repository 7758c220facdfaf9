"""The peer rank of ``bench_comm.py``: joins the job and mirrors the timed rank's calls."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from benchmarks.comm_ops import serve
    from mcore.distributed_env import init_if_needed
    from mcore.parallel_state import ParallelDims

    init_if_needed()
    if os.environ.get("MS_ROLE") == "MS_WORKER":
        serve(ParallelDims.build().world)
