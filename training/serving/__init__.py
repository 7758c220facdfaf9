"""The OpenAI-compatible server behind ``training/serve.py`` (see docs/serving.md).

``engine``: continuous batching (one thread owns the model), ``slot_cache``: the per-row KV
cache it decodes with, ``app``: the Starlette HTTP front end, ``protocol``: request validation
and OpenAI response shapes, ``text_stream``: detokenisation with stop strings; under msrun
(tp > 1) ``tp_load`` loads this rank's shard and ``lockstep`` replays rank 0's model steps on
the other ranks. Chat templates are fine-tuning's (``training.data.chat``).
"""
