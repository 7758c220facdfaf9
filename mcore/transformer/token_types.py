"""Token-type (segment) embeddings: one learned vector per input segment, added to the token
embedding (BERT's sentence A / sentence B).

``TokenTypeEmbedding(num_types, hidden_size)`` holds ``weight [num_types, h]``, replicated over
tp (it is tiny; its input and gradient are complete on every rank, so its gradient is too).
``token_type_ids [b, s]`` (int in ``[0, num_types)``) -> ``[b, s, h]``; ``None`` means every
token is of type 0 (``[b, s]`` taken from ``like``, the token ids).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops

from mcore.tensor_parallel.random import name_seed


class TokenTypeEmbedding(nn.Cell):
    """See the module docstring; initial values N(0, 0.02) from a seed derived from ``name``."""

    def __init__(self, num_types: int, hidden_size: int, dtype=ms.float32,
                 name: str = "token_type_embedding"):
        super().__init__()
        if num_types < 1:
            raise ValueError(f"TokenTypeEmbedding '{name}': num_types={num_types} must be >= 1")
        rng = np.random.default_rng(name_seed(name))
        table = rng.normal(0.0, 0.02, (num_types, hidden_size)).astype(np.float32)
        self.num_types = num_types
        self.weight = Parameter(ms.Tensor(table, dtype), name=f"{name}.weight")

    def construct(self, token_type_ids, like):
        if token_type_ids is None:
            token_type_ids = ops.zeros(like.shape, ms.int32)  # [b, s]: every token type 0
        return ops.gather(self.weight, token_type_ids, 0)  # [b, s] -> [b, s, h]
