"""Embedding table split on the vocabulary across the tp group (Megatron's VocabParallelEmbedding).

The vocabulary ``V`` is padded with zero rows to ``V_pad``, a multiple of ``P * vocab_multiple``
(``P`` = tp size), and tp rank ``r`` holds rows ``[r * V_pad/P, (r + 1) * V_pad/P)``:
``weight`` [V_pad/P, h]. Each rank looks up the ids it owns, writes zeros for the others, and
the partial embeddings are summed over the group (reduce-scattered on the sequence with
``sequence_parallel``). Ids outside ``[0, V)`` embed to zeros.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops

from mcore.parallel_state import ProcessGroup
from mcore.tensor_parallel.layers import check_sequence
from mcore.tensor_parallel.mappings import ReduceFromTPRegion, ReduceScatterToSPRegion
from mcore.tensor_parallel.random import init_master, name_seed
from mcore.tensor_parallel.sharding import pad, padded_size, shard


class VocabParallelEmbedding(nn.Cell):
    """ids [b, s] (int) -> embeddings [b, s, h] replicated, or [b, s/P, h] with
    ``sequence_parallel``. ``weight``: this rank's rows of the padded table, [V_pad/P, h].
    ``num_embeddings`` = V (real vocabulary), ``padded_vocab_size`` = V_pad. ``name`` seeds the
    table (when ``seed`` is None) and names the parameter ``<name>.weight`` until a parent Cell
    renames it after its attribute path (see ``mcore.tensor_parallel.layers``)."""

    shard_dims = {"weight": 0}

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group: ProcessGroup,
                 init_method=None, seed: int | None = None, sequence_parallel: bool = False,
                 vocab_multiple: int = 1, name: str = "vocab_parallel_embedding",
                 params_dtype=ms.float32):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"VocabParallelEmbedding '{name}': sizes must be positive, got "
                             f"num_embeddings {num_embeddings}, embedding_dim {embedding_dim}")
        self.group, self.layer_name = tp_group, name
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_vocab_size = padded_size(num_embeddings, tp_group.size * vocab_multiple)
        self.per_rank = self.padded_vocab_size // tp_group.size
        self.vocab_start = tp_group.rank * self.per_rank
        self.sequence_parallel = sequence_parallel
        seed = name_seed(name) if seed is None else seed
        full = init_master((num_embeddings, embedding_dim), seed, init_method)  # [V, h]
        full = pad(full, self.padded_vocab_size, 0)  # [V_pad, h]
        self.weight = Parameter(ms.Tensor(shard(full, tp_group.size, tp_group.rank, 0),
                                          params_dtype), name=f"{name}.weight")
        self.weight.sequence_parallel = False
        if sequence_parallel:
            self.reduce = ReduceScatterToSPRegion(tp_group)  # [b, s, h] -> [b, s/P, h]
        else:
            self.reduce = ReduceFromTPRegion(tp_group)

    def construct(self, ids):
        if self.sequence_parallel:
            check_sequence(ids, self.group, "VocabParallelEmbedding", self.layer_name)
        local = ids - self.vocab_start
        owned = ops.logical_and(local >= 0, local < self.per_rank)  # [b, s] bool
        local = local * owned.astype(local.dtype)  # ids of other ranks -> row 0 (masked below)
        emb = ops.gather(self.weight, local, 0)  # [b, s] -> [b, s, h]
        emb = emb * ops.expand_dims(owned.astype(emb.dtype), -1)
        return self.reduce(emb)
