"""BertModel: a bidirectional encoder with a masked-language-model head (BERT and its kin).

``BertModel(config, layer_spec=None, vocab_size=..., type_vocab_size=2, groups=None)``, from
``mcore`` blocks:

- ``embedding`` (``VocabParallelEmbedding`` ``[V/tp, h]``) + ``position_embedding``
  (``LearnedPositionEmbedding`` ``[config.max_position_embeddings, h]``) +
  ``token_type_embedding`` (``TokenTypeEmbedding`` ``[type_vocab_size, h]``), then
  ``embedding_norm`` (the config's norm);
- ``encoder``: ``TransformerBlock`` of ``layer_spec`` (default ``encoder_layer_spec(config)``:
  post-norm layers with bidirectional self-attention) and no final norm (each post-norm layer
  ends with one);
- ``lm_head``: ``MLMHead`` (dense, activation, norm, then the word embedding as the decoder,
  plus a vocabulary bias; the decoder is always tied).

``model(input_ids [b, s], token_type_ids=None, attention_mask=None)`` -> MLM logits
``[b, s, V]`` (gathered over tp). ``token_type_ids [b, s]``: None = all type 0.
``attention_mask [b, s]`` (int): 1 = real token, 0 = padding key (hidden from every query;
padding positions still get logits); None = no padding. Positions are ``0 .. s - 1``.
``mlm_loss(input_ids, labels, token_type_ids=None, attention_mask=None)`` -> ``[]``: the mean
cross-entropy over the positions whose label is not -100 (0 when there is none), computed on
the vocab-split logits (``vocab_parallel_cross_entropy``). Dropout is not applied.
``model.config``, ``model.groups``, ``model.tp_group`` and ``model.vocab_size`` record the
arguments; the weight tables of ``models.weights`` / ``models.hf`` name the parameters.
Sequence and context parallelism are refused (``NotImplementedError`` / ``ValueError``).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy
from mcore.tensor_parallel.embedding import VocabParallelEmbedding
from mcore.tensor_parallel.mappings import GatherFromTPRegion
from mcore.transformer.block import TransformerBlock
from mcore.transformer.config import TransformerConfig
from mcore.transformer.mlm_head import MLMHead
from mcore.transformer.norm import norm_class
from mcore.transformer.positions import LearnedPositionEmbedding
from mcore.transformer.post_norm_layer import encoder_layer_spec
from mcore.transformer.spec import IdentityOp
from mcore.transformer.token_types import TokenTypeEmbedding


class BertModel(nn.Cell):
    """Encoder with an MLM head; see the module docstring for the contract."""

    def __init__(self, config: TransformerConfig, layer_spec=None, vocab_size: int = 0,
                 type_vocab_size: int = 2, groups: ModelGroups | None = None):
        super().__init__()
        groups = groups or ModelGroups()
        if config.parallel.sequence_parallel:
            raise NotImplementedError("BertModel: parallel.sequence_parallel=True is not "
                                      "implemented")
        if groups.cp.size > 1:
            raise ValueError("BertModel: context parallelism (groups.cp of size > 1) is not "
                             "supported (its attention is causal)")
        if config.position_embedding != "learned":
            raise ValueError(f"BertModel: position_embedding={config.position_embedding!r}; "
                             f"needs 'learned' (absolute positions)")
        if vocab_size < 1 or vocab_size % groups.tp.size:
            raise ValueError(f"vocab_size={vocab_size}: must be positive and divisible by "
                             f"tensor parallel size {groups.tp.size}")
        self.config, self.vocab_size, self.tie_embeddings = config, vocab_size, True
        self.groups, self.tp_group = groups, groups.tp
        h, dtype = config.hidden_size, config.params_dtype
        self.embedding = VocabParallelEmbedding(vocab_size, h, groups.tp, params_dtype=dtype)
        self.position_embedding = LearnedPositionEmbedding(config.max_position_embeddings, h,
                                                           dtype)
        self.token_type_embedding = TokenTypeEmbedding(type_vocab_size, h, dtype)
        self.embedding_norm = norm_class(config.norm)(h, eps=config.norm_eps, dtype=dtype,
                                                      name="embedding_norm")
        self.encoder = TransformerBlock(config, layer_spec or encoder_layer_spec(config),
                                        groups=groups, final_norm=IdentityOp)
        self.lm_head = MLMHead(config, vocab_size, groups.tp)
        self.gather_logits = GatherFromTPRegion(groups.tp)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write a Hugging Face directory (see ``models.hf.save_pretrained``)."""
        from models.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes)

    def encode(self, input_ids, token_type_ids=None, attention_mask=None):
        """``[b, s]`` ids -> the last layer's hidden states ``[b, s, h]``."""
        b, s = input_ids.shape
        positions = ops.broadcast_to(ops.arange(0, s, 1, dtype=ms.int32).reshape(1, s), (b, s))
        x = self.embedding(input_ids) + self.position_embedding(positions)  # [b, s, h]
        x = self.embedding_norm(x + self.token_type_embedding(token_type_ids, input_ids))
        return self.encoder(x, None, None, attention_mask)  # no rotary: cos, sin unused

    def _logits(self, input_ids, token_type_ids, attention_mask):
        x = self.encode(input_ids, token_type_ids, attention_mask)
        return self.lm_head(x, self.embedding.weight)  # [b, s, h] -> [b, s, V/tp]

    def construct(self, input_ids, token_type_ids=None, attention_mask=None):
        return self.gather_logits(self._logits(input_ids, token_type_ids, attention_mask))

    def mlm_loss(self, input_ids, labels, token_type_ids=None, attention_mask=None):
        """Mean cross-entropy over the labelled positions (``labels != -100``) -> ``[]``."""
        logits = self._logits(input_ids, token_type_ids, attention_mask)  # [b, s, V/tp]
        token_loss = vocab_parallel_cross_entropy(logits, labels, self.tp_group)  # [b, s]
        return masked_mean(token_loss, labels)
