"""Fused kernels behind one registry (``registry.py``): each op has a composed reference and a
per-device choice made when a layer is built; ``attention.py`` is core attention,
``cpu_build.py`` / ``cpu_ops.py`` / ``csrc/`` the C++ CPU kernels. See docs/fusions.md."""
