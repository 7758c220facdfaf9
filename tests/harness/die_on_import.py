"""A worker module whose import fails on rank 1, i.e. before that rank joins the cluster."""
import os

if os.environ.get("MS_NODE_ID") == "1":
    raise RuntimeError("rank 1 died before init")


def worker(ctx):
    raise AssertionError("unreachable: rank 1 never joins, so init() cannot complete")
