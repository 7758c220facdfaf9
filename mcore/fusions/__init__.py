"""Fused kernels behind one dispatch: the device's fused op where it has one, a composed
implementation elsewhere (``attention.py``: core attention)."""
