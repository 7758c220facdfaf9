"""MLMHead: the masked-language-model head of BERT-style encoders, vocabulary-parallel.

    t      = norm(act(dense(x)))            dense h -> h with bias, the config's activation/norm
    logits = t W^T + bias                   W [V, h]: the word embedding (tied decoder)

Over the tp group (size ``P``) the vocabulary is split as in ``VocabParallelEmbedding``: this
rank holds ``W``'s rows ``[V/P, h]`` (the embedding's own shard, passed to ``construct``) and
``bias [V/P]`` (``shard_dims``: split on dim 0), and returns its logits ``[b, s, V/P]``
(gather them with ``GatherFromTPRegion`` or feed them to ``vocab_parallel_cross_entropy``).
``dense`` and ``norm`` are replicated: the input ``x [b, s, h]`` must be complete on every
rank; the transformed ``t`` enters the tp region through ``CopyToTPRegion``, whose backward
sums the per-rank (own-vocabulary) gradients, so the gradients of ``dense`` and ``norm`` are
complete and equal on every rank (no finaliser step).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops

from mcore.parallel_state import ProcessGroup
from mcore.tensor_parallel.layers import ReplicatedLinear, divide
from mcore.tensor_parallel.mappings import CopyToTPRegion
from mcore.transformer.config import TransformerConfig
from mcore.transformer.mlp import activate
from mcore.transformer.norm import norm_class


class MLMHead(nn.Cell):
    """See the module docstring; ``vocab_size`` V must divide by the tp size."""

    shard_dims = {"bias": 0}

    def __init__(self, config: TransformerConfig, vocab_size: int, tp_group: ProcessGroup,
                 name: str = "lm_head"):
        super().__init__()
        h, dtype = config.hidden_size, config.params_dtype
        local = divide(vocab_size, tp_group, "MLMHead", name, "vocab_size")
        self.activation = config.activation
        self.dense = ReplicatedLinear(h, h, bias=True, name=f"{name}.dense", params_dtype=dtype)
        self.norm = norm_class(config.norm)(h, eps=config.norm_eps, dtype=dtype,
                                            name=f"{name}.norm")
        self.bias = Parameter(ms.Tensor(np.zeros(local, np.float32), dtype), name=f"{name}.bias")
        self.enter = CopyToTPRegion(tp_group)
        self.matmul_t = ops.MatMul(transpose_b=True)

    def construct(self, x, weight):
        """``x [b, s, h]`` and the tied ``weight [V/P, h]`` -> logits ``[b, s, V/P]``."""
        t = self.enter(self.norm(activate(self.dense(x), self.activation)))  # [b, s, h]
        b, s, h = t.shape
        logits = self.matmul_t(t.reshape(b * s, h), weight)  # [b s, h] @ [V/P, h]^T
        return logits.reshape(b, s, logits.shape[-1]) + self.bias  # -> [b, s, V/P]
