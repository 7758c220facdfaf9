"""Tensor and sequence parallelism (Megatron's ``tensor_parallel``), with explicit groups.

- ``mappings``: f/g regions (copy / reduce / scatter / gather, sequence-parallel forms).
- ``layers``: ``ColumnParallelLinear``, ``RowParallelLinear``, ``ReplicatedLinear``.
- ``embedding``: ``VocabParallelEmbedding``.
- ``cross_entropy``: ``vocab_parallel_cross_entropy``, ``TokenCrossEntropy`` (its Cell with the
  fused op at tp=1), ``masked_mean``.
- ``random``: named seed streams (``model_parallel_seed``) and tp-independent initialisation.
- ``recompute``: ``checkpoint`` / ``Recompute``.
- ``sharding``: ``shard`` / ``merge`` full weights for a tp rank.
"""
from mcore.tensor_parallel.cross_entropy import (TokenCrossEntropy, VocabParallelCrossEntropy,
                                                 masked_mean, vocab_parallel_cross_entropy)
from mcore.tensor_parallel.embedding import VocabParallelEmbedding
from mcore.tensor_parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from mcore.tensor_parallel.mappings import (CopyToTPRegion, GatherFromSPRegion, GatherFromTPRegion,
                                            ReduceFromTPRegion, ReduceScatterToSPRegion,
                                            ScatterToSPRegion, ScatterToTPRegion,
                                            copy_to_tensor_model_parallel_region,
                                            gather_from_sequence_parallel_region,
                                            gather_from_tensor_model_parallel_region,
                                            reduce_from_tensor_model_parallel_region,
                                            reduce_scatter_to_sequence_parallel_region,
                                            scatter_to_sequence_parallel_region,
                                            scatter_to_tensor_model_parallel_region)
from mcore.tensor_parallel.random import (DEFAULT, EXPERT_PARALLEL, MODEL_PARALLEL, Dropout,
                                          RNGStatesTracker, init_master, init_normal, init_shard,
                                          model_parallel_seed)
from mcore.tensor_parallel.recompute import Recompute, checkpoint
from mcore.tensor_parallel.sharding import merge, pad, padded_size, shard

__all__ = [
    "CopyToTPRegion", "ReduceFromTPRegion", "ScatterToTPRegion", "GatherFromTPRegion",
    "ScatterToSPRegion", "GatherFromSPRegion", "ReduceScatterToSPRegion",
    "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "ColumnParallelLinear", "RowParallelLinear", "ReplicatedLinear", "VocabParallelEmbedding",
    "VocabParallelCrossEntropy", "TokenCrossEntropy", "vocab_parallel_cross_entropy", "masked_mean",
    "RNGStatesTracker", "model_parallel_seed", "Dropout", "DEFAULT", "MODEL_PARALLEL",
    "EXPERT_PARALLEL", "init_normal", "init_master", "init_shard",
    "checkpoint", "Recompute", "shard", "merge", "pad", "padded_size",
]
