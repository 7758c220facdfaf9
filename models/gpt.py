"""GPTModel: token embedding -> TransformerBlock -> final norm -> output head, whole or as one
pipeline stage.

``GPTModel(config, layer_spec, vocab_size, tie_embeddings=False, tp_group=None,
pre_process=True, post_process=True, layer_range=None, embedding_group=None)``:

- ``embedding``: ``VocabParallelEmbedding`` ``[V/tp, h]`` (only with ``pre_process``).
- ``rotary``: ``RotaryEmbedding`` from ``config.rotary`` (cos/sin computed once per forward,
  on every stage, from the positions).
- ``decoder``: ``TransformerBlock`` of ``layer_spec``: layers ``layer_range`` (global indices,
  default all), with its final norm only with ``post_process``.
- ``output_layer``: column-parallel ``h -> V`` (``[V/tp, h]``), or the embedding weight when
  ``tie_embeddings`` (only with ``post_process``).

``model(input_ids [b, s])`` returns logits ``[b, s, V]`` (gathered over tp). With ``labels``
``[b, s]`` it returns the per-token vocab-parallel cross-entropy ``[b, s]`` instead (logits
stay split over tp): ``loss[:, t]`` scores the logits at position ``t`` against
``labels[:, t]``, with no shift inside the model. For next-token training pass the NEXT tokens,
``input_ids = tokens[:, :-1]``, ``labels = tokens[:, 1:]`` (``training/data/sampler.py`` does);
``labels == -100`` gives 0 at that position (``masked_mean`` skips it).
``position_ids [b, s]`` default to ``offset .. offset + s - 1`` with ``offset`` the cache
length; ``key_mask [b, t]`` marks real (1) vs padding (0) keys; ``cache`` is a ``KVCache``
(PyNative) or ``StaticKVCache`` (also under jit); see ``models.generate``.

**Pipeline stages** (see docs/pipeline_parallel.md, "GPTModel as stages"). A stage holds the
layers ``layer_range`` (built with their GLOBAL ``layer_number``: same initial weights, same
parameter names ``decoder.layers.<global i>.*`` as the full model, so checkpoints and the HF
weight tables apply unchanged).

- ``pre_process=False``: no embedding; the first argument of ``construct`` is the previous
  stage's hidden state ``[b, s, h]`` instead of token ids.
- ``post_process=False``: no final norm, no head; ``construct`` returns the hidden state
  ``[b, s, h]`` (``labels`` must then be None).
- ``stage_forward(x, ...)``: the stage without the last step: hidden state, or on a
  ``post_process`` stage the tp-local logits ``[b, s, V/tp]`` (what a pipeline loss takes).
- Tied embeddings over several stages (Megatron's scheme): a ``post_process`` stage without
  ``pre_process`` builds its own copy of the embedding table for the head, named
  ``embedding.weight`` like the first stage's (the HF table maps it to ``embed_tokens``; in
  a checkpoint the two copies are one logical tensor, equal after every step) and initialised
  identically (same seed). Both copies carry ``param.shared_embedding = True``; the training
  loop sums their gradients over ``dims.embedding`` (``embedding_group``, first + last pp
  stage; ``mcore.pipeline_parallel.stage.sync_embedding_grads(grads, dims, params)``) so both
  apply the same update (count the copy once in a global gradient norm). ``embedding_group``
  (default: a size-one group) is recorded as ``model.embedding_group`` for that sum; the model
  itself never communicates over it. A model holding both ends (pp = 1) keeps one weight,
  unflagged (summing over a size-one group would be the identity anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import nn, ops

from mcore.parallel_state import ProcessGroup
from mcore.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mcore.tensor_parallel.embedding import VocabParallelEmbedding
from mcore.tensor_parallel.layers import ColumnParallelLinear
from mcore.tensor_parallel.mappings import CopyToTPRegion, GatherFromTPRegion
from mcore.transformer.block import TransformerBlock, check_layer_range
from mcore.transformer.config import TransformerConfig
from mcore.transformer.kv_cache import KVCache
from mcore.transformer.rotary import RotaryEmbedding
from mcore.transformer.static_kv_cache import StaticKVCache


@dataclass(frozen=True)
class StageSpec:
    """What one pipeline stage of a GPTModel holds: the embedding (``pre_process``), the final
    norm + head (``post_process``) and the layers ``layer_range`` (global indices)."""

    pre_process: bool
    post_process: bool
    layer_range: range

    @staticmethod
    def full(num_layers: int) -> "StageSpec":
        """The whole model as one stage."""
        return StageSpec(True, True, range(num_layers))


class GPTModel(nn.Cell):
    """Decoder-only language model; see the module docstring for the contract."""

    def __init__(self, config: TransformerConfig, layer_spec, vocab_size: int,
                 tie_embeddings: bool = False, tp_group: ProcessGroup | None = None,
                 pre_process: bool = True, post_process: bool = True,
                 layer_range: range | None = None, embedding_group: ProcessGroup | None = None):
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
        self.pre_process, self.post_process = bool(pre_process), bool(post_process)
        self.layer_range = check_layer_range(layer_range, config.num_layers)
        self.embedding_group = embedding_group or ProcessGroup.single("embedding")
        # The head's copy of a tied table lives on the last stage under the same name.
        self.embedding = None
        if self.pre_process or (self.post_process and tie_embeddings):
            self.embedding = VocabParallelEmbedding(vocab_size, config.hidden_size, tp_group)
            if tie_embeddings and self.pre_process != self.post_process:
                self.embedding.weight.shared_embedding = True
        self.rotary = RotaryEmbedding(config.rotary, config.rotary_dim)
        self.decoder = TransformerBlock(config, layer_spec, tp_group=tp_group,
                                        layer_range=self.layer_range,
                                        post_process=self.post_process)
        self.output_layer = None
        if self.post_process and tie_embeddings:
            self.enter_head = CopyToTPRegion(tp_group)
        elif self.post_process:
            self.output_layer = ColumnParallelLinear(config.hidden_size, vocab_size, tp_group,
                                                     bias=False, name="output_layer")
        self.gather_logits = GatherFromTPRegion(tp_group)
        self.matmul_t = ops.MatMul(transpose_b=True)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write a Hugging Face directory (see ``models.hf.save_pretrained``)."""
        from models.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes)

    def new_cache(self, batch: int | None = None, max_len: int | None = None):
        """An empty KV cache for this model's layers (``layer_range``): a growing ``KVCache``
        (PyNative), or with ``batch`` and ``max_len`` a ``StaticKVCache`` that compiled
        decoding can use (see ``mcore.transformer``)."""
        if max_len is None:
            return KVCache(self.layer_range)
        cfg = self.config
        shape = (batch, cfg.num_query_groups // self.tp_group.size, max_len, cfg.head_dim)
        return StaticKVCache(self.layer_range, shape)

    def _head(self, x):
        if self.output_layer is not None:
            return self.output_layer(x)  # [b, s, h] -> [b, s, V/tp]
        b, s, h = x.shape
        x = self.enter_head(x).reshape(b * s, h)  # [b, s, h] -> [b s, h]
        logits = self.matmul_t(x, self.embedding.weight)  # [b s, h] @ [V/tp, h]^T
        return logits.reshape(b, s, logits.shape[-1])  # -> [b, s, V/tp]

    def stage_forward(self, x, position_ids=None, key_mask=None, cache=None):
        """Token ids ``[b, s]`` (``pre_process``) or hidden state ``[b, s, h]`` -> hidden state
        ``[b, s, h]``, or tp-local logits ``[b, s, V/tp]`` with ``post_process``."""
        b, s = x.shape[0], x.shape[1]
        if position_ids is None:
            offset = 0 if cache is None else cache.length
            position_ids = ops.arange(offset, offset + s, 1, dtype=ms.int32).reshape(1, s)
            position_ids = ops.broadcast_to(position_ids, (b, s))  # [1, s] -> [b, s]
        if self.pre_process:
            x = self.embedding(x)  # [b, s] -> [b, s, h]
        cos, sin = self.rotary(position_ids)  # [b, 1, s, r] each
        x = self.decoder(x, cos, sin, key_mask, cache)  # [b, s, h]
        if self.post_process:
            x = self._head(x)  # [b, s, h] -> [b, s, V/tp]
        return x

    def construct(self, input_ids, position_ids=None, key_mask=None, labels=None, cache=None):
        if labels is not None and not self.post_process:
            raise ValueError("GPTModel: labels given to a stage without post_process (no head)")
        x = self.stage_forward(input_ids, position_ids, key_mask, cache)
        if not self.post_process:
            return x  # [b, s, h]
        if labels is not None:
            return vocab_parallel_cross_entropy(x, labels, self.tp_group)  # [b, s]
        return self.gather_logits(x)  # [b, s, V/tp] -> [b, s, V]
