"""Gradient synchronisation across data-parallel ranks and the distributed optimizer (ZeRO-1).
Not built here yet: the training step (``training/step.py``) all-reduces gradients over
``dims.dp`` itself."""
