"""Pipeline parallelism: stages, point-to-point transfers and the 1F1B / interleaved schedules.

Read in this order (see docs/pipeline_parallel.md):

- ``schedule_order``: each rank's order of forwards / backwards (pure Python);
- ``comm_plan``: that order interleaved with matched neighbour exchanges, and a simulator that
  proves the programs deadlock-free (pure Python);
- ``p2p``: the transfers, Megatron's names, on ``mcore.comm.p2p.exchange``;
- ``stage``: a stage from any list of Cells, layer splits, compiled forward / backward steps;
- ``schedules``: ``forward_backward_func(...)`` and ``get_forward_backward_func(pp, vpp)``.

Submodules are imported explicitly (this package imports no MindSpore by itself).
"""
