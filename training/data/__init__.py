"""Data pipeline: corpus -> tokenizer -> indexed dataset (.bin/.idx) -> fixed-length samples.

``build_data(cfg, rank)`` in ``pipeline.py`` runs the whole chain with caching; the pieces are
``corpus.py``, ``tokenizer.py``, ``indexed_dataset.py``, ``preprocess.py`` and ``sampler.py``.
"""
