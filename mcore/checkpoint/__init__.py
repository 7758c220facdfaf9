"""Sharded checkpoints with global offsets (save on one layout, load on another). Not built yet:
``training/checkpointing.py`` saves and loads per-rank shards for the same layout."""
