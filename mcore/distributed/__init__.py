"""Gradient synchronisation across data-parallel ranks: ``finalize`` (every parameter's gradient
reduced as what it carries says: dense over dp, experts over edp, sequence-parallel ones over
tp, tied embeddings over the embedding group) and ``grad_norm`` (the global norm, each
parameter counted once). Used by ``training.step.TrainStep`` and
``training.pipeline_step.PipelineTrainStep``; and the distributed optimizer (ZeRO-1:
``distributed_optimizer.DistributedAdamW`` over the flat buckets of ``buckets``), which
``TrainStep`` uses with ``optimizer.distributed``."""
