"""GPTModel: token embedding -> TransformerBlock -> final norm -> output head.

``GPTModel(config, layer_spec, vocab_size, tie_embeddings=False, tp_group=None)``:

- ``embedding``: ``VocabParallelEmbedding`` ``[V/tp, h]``.
- ``rotary``: ``RotaryEmbedding`` from ``config.rotary`` (cos/sin computed once per forward).
- ``decoder``: ``TransformerBlock`` of ``layer_spec`` (with its final norm).
- ``output_layer``: column-parallel ``h -> V`` (``[V/tp, h]``), or the embedding weight when
  ``tie_embeddings``.

``model(input_ids [b, s])`` returns logits ``[b, s, V]`` (gathered over tp). With ``labels``
``[b, s]`` it returns the per-token vocab-parallel cross-entropy ``[b, s]`` instead (logits
stay split over tp). ``position_ids [b, s]`` default to ``offset .. offset + s - 1`` with
``offset`` the cache length; ``key_mask [b, t]`` marks real (1) vs padding (0) keys;
``cache`` is a ``KVCache`` (PyNative) or ``StaticKVCache`` (also under jit); see
``models.generate``.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from mcore.parallel_state import ProcessGroup
from mcore.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mcore.tensor_parallel.embedding import VocabParallelEmbedding
from mcore.tensor_parallel.layers import ColumnParallelLinear
from mcore.tensor_parallel.mappings import CopyToTPRegion, GatherFromTPRegion
from mcore.transformer.block import TransformerBlock
from mcore.transformer.config import TransformerConfig
from mcore.transformer.kv_cache import KVCache
from mcore.transformer.rotary import RotaryEmbedding
from mcore.transformer.static_kv_cache import StaticKVCache


class GPTModel(nn.Cell):
    """Decoder-only language model; see the module docstring for the contract."""

    def __init__(self, config: TransformerConfig, layer_spec, vocab_size: int,
                 tie_embeddings: bool = False, tp_group: ProcessGroup | None = None):
        super().__init__()
        tp_group = tp_group or ProcessGroup.single("tp")
        if vocab_size % tp_group.size:
            raise ValueError(f"vocab_size={vocab_size}: must be divisible by tensor parallel "
                             f"size {tp_group.size}")
        if config.parallel.sequence_parallel:
            raise NotImplementedError("parallel.sequence_parallel=True: GPTModel does not split "
                                      "the sequence yet (the layers support it)")
        self.config, self.vocab_size, self.tp_group = config, vocab_size, tp_group
        self.tie_embeddings = tie_embeddings
        self.embedding = VocabParallelEmbedding(vocab_size, config.hidden_size, tp_group)
        self.rotary = RotaryEmbedding(config.rotary, config.rotary_dim)
        self.decoder = TransformerBlock(config, layer_spec, tp_group=tp_group)
        if tie_embeddings:
            self.output_layer = None
            self.enter_head = CopyToTPRegion(tp_group)
        else:
            self.output_layer = ColumnParallelLinear(config.hidden_size, vocab_size, tp_group,
                                                     bias=False, name="output_layer")
        self.gather_logits = GatherFromTPRegion(tp_group)
        self.matmul_t = ops.MatMul(transpose_b=True)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write a Hugging Face directory (see ``models.hf.save_pretrained``)."""
        from models.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes)

    def new_cache(self, batch: int | None = None, max_len: int | None = None):
        """An empty KV cache: a growing ``KVCache`` (PyNative), or with ``batch`` and ``max_len``
        a ``StaticKVCache`` that compiled decoding can use (see ``mcore.transformer``)."""
        if max_len is None:
            return KVCache(self.config.num_layers)
        cfg = self.config
        shape = (batch, cfg.num_query_groups // self.tp_group.size, max_len, cfg.head_dim)
        return StaticKVCache(cfg.num_layers, shape)

    def _head(self, x):
        if self.output_layer is not None:
            return self.output_layer(x)  # [b, s, h] -> [b, s, V/tp]
        b, s, h = x.shape
        x = self.enter_head(x).reshape(b * s, h)  # [b, s, h] -> [b s, h]
        logits = self.matmul_t(x, self.embedding.weight)  # [b s, h] @ [V/tp, h]^T
        return logits.reshape(b, s, logits.shape[-1])  # -> [b, s, V/tp]

    def construct(self, input_ids, position_ids=None, key_mask=None, labels=None, cache=None):
        b, s = input_ids.shape
        if position_ids is None:
            offset = 0 if cache is None else cache.length
            position_ids = ops.arange(offset, offset + s, 1, dtype=ms.int32).reshape(1, s)
            position_ids = ops.broadcast_to(position_ids, (b, s))  # [1, s] -> [b, s]
        x = self.embedding(input_ids)  # [b, s] -> [b, s, h]
        cos, sin = self.rotary(position_ids)  # [b, 1, s, r] each
        x = self.decoder(x, cos, sin, key_mask, cache)  # [b, s, h]
        logits = self._head(x)  # [b, s, V/tp]
        if labels is not None:
            return vocab_parallel_cross_entropy(logits, labels, self.tp_group)  # [b, s]
        return self.gather_logits(logits)  # [b, s, V/tp] -> [b, s, V]
