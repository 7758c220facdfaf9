"""T5Model: an encoder-decoder language model (T5, T5 v1.1, Flan-T5) built from ``mcore`` blocks.

``T5Model(config: T5Config, tie_embeddings=True, groups=None)``:

- ``embedding``: ``VocabParallelEmbedding`` ``[V/tp, h]``, shared by the encoder and the
  decoder input (T5's ``shared``);
- ``encoder``: ``mcore.transformer.encoder_decoder.EncoderBlock`` (bidirectional self-attention
  with a bucketed relative position bias, MLP, pre-norm, final norm);
- ``decoder``: ``DecoderBlock`` (causal self-attention with its own unidirectional bias,
  cross-attention to the encoder output, MLP, final norm);
- head: the embedding weight when ``tie_embeddings`` (the decoder output is first multiplied by
  ``h ** -0.5`` when ``config.scale_decoder_outputs``, as original T5 does), else
  ``output_layer``, a column-parallel ``h -> V`` without bias.

Forward ``model(input_ids [b, t], decoder_input_ids [b, s], attention_mask=None,
labels=None)``: logits ``[b, s, V]`` (gathered over tp); with ``labels [b, s]`` the per-token
vocab-parallel cross-entropy ``[b, s]`` instead (``labels == -100`` gives 0;
``loss(...)`` is its mean over the other tokens, transformers' ``loss``). ``attention_mask
[b, t]`` (1 = token, 0 = padding) hides encoder padding from the encoder's self-attention and
from every cross-attention. ``encode(input_ids, attention_mask)`` -> ``[b, t, h]`` and
``decode(decoder_input_ids, memory, attention_mask)`` -> logits split over tp run the halves.
``greedy_generate`` encodes once and recomputes the decoder for every new token (no KV cache).
Groups: ``groups.tp`` (``ModelGroups``; None = single process), as the blocks it holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy
from mcore.tensor_parallel.embedding import VocabParallelEmbedding
from mcore.tensor_parallel.layers import ColumnParallelLinear
from mcore.tensor_parallel.mappings import CopyToTPRegion, GatherFromTPRegion
from mcore.transformer.config import TransformerConfig
from mcore.transformer.encoder_decoder import DecoderBlock, EncoderBlock


@dataclass(frozen=True)
class T5Config:
    """Architecture of an encoder-decoder model.

    transformer: layer shapes (``num_layers`` = encoder layers, heads, ``head_dim``, MLP,
        norm, ``attention.softmax_scale``), shared by both stacks.
    num_decoder_layers: decoder depth. vocab_size: rows of the shared embedding.
    num_buckets, max_distance: the relative position buckets (``mcore.transformer.
        relative_position``). scale_decoder_outputs: multiply the decoder output by
        ``hidden_size ** -0.5`` before a tied head. decoder_start_token_id: first decoder input.
    """

    transformer: TransformerConfig
    num_decoder_layers: int
    vocab_size: int
    num_buckets: int = 32
    max_distance: int = 128
    scale_decoder_outputs: bool = True
    decoder_start_token_id: int = 0

    @property
    def num_layers(self) -> int:
        """Encoder depth (``transformer.num_layers``)."""
        return self.transformer.num_layers


class T5Model(nn.Cell):
    """Encoder-decoder model; see the module docstring for the contract."""

    def __init__(self, config: T5Config, tie_embeddings: bool = True,
                 groups: ModelGroups | None = None):
        super().__init__()
        groups = groups or ModelGroups()
        tp_group = groups.tp
        cfg = config.transformer
        if config.vocab_size % tp_group.size:
            raise ValueError(f"vocab_size={config.vocab_size}: must be divisible by tensor "
                             f"parallel size {tp_group.size}")
        self.config, self.vocab_size = config, config.vocab_size
        self.groups, self.tp_group = groups, tp_group
        self.tie_embeddings = bool(tie_embeddings)
        dtype = cfg.params_dtype
        self.embedding = VocabParallelEmbedding(config.vocab_size, cfg.hidden_size, tp_group,
                                                params_dtype=dtype)
        self.encoder = EncoderBlock(cfg, cfg.num_layers, config.num_buckets, config.max_distance,
                                    groups)
        self.decoder = DecoderBlock(cfg, config.num_decoder_layers, config.num_buckets,
                                    config.max_distance, groups)
        self.output_layer = None
        if tie_embeddings:
            self.enter_head = CopyToTPRegion(tp_group)
            self.head_scale = cfg.hidden_size ** -0.5 if config.scale_decoder_outputs else 1.0
        else:
            self.output_layer = ColumnParallelLinear(cfg.hidden_size, config.vocab_size,
                                                     tp_group, bias=False, name="output_layer",
                                                     params_dtype=dtype)
        self.gather_logits = GatherFromTPRegion(tp_group)
        self.matmul_t = ops.MatMul(transpose_b=True)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write a Hugging Face directory (see ``models.hf.save_pretrained``)."""
        from models.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes)

    def encode(self, input_ids, attention_mask=None):
        """``input_ids [b, t]`` -> encoder output ``[b, t, h]`` (replicated over tp)."""
        return self.encoder(self.embedding(input_ids), attention_mask)

    def decode(self, decoder_input_ids, memory, attention_mask=None):
        """``decoder_input_ids [b, s]``, encoder output ``memory [b, t, h]`` -> tp-local logits
        ``[b, s, V/tp]``."""
        x = self.decoder(self.embedding(decoder_input_ids), memory, attention_mask)  # [b, s, h]
        if self.output_layer is not None:
            return self.output_layer(x)  # [b, s, h] -> [b, s, V/tp]
        x = self.enter_head(x * self.head_scale)
        b, s, h = x.shape
        logits = self.matmul_t(x.reshape(b * s, h), self.embedding.weight)  # [b s, V/tp]
        return logits.reshape(b, s, logits.shape[-1])  # [b s, V/tp] -> [b, s, V/tp]

    def construct(self, input_ids, decoder_input_ids, attention_mask=None, labels=None):
        memory = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, memory, attention_mask)  # [b, s, V/tp]
        if labels is not None:
            return vocab_parallel_cross_entropy(logits, labels, self.tp_group)  # [b, s]
        return self.gather_logits(logits)  # [b, s, V/tp] -> [b, s, V]

    def loss(self, input_ids, decoder_input_ids, labels, attention_mask=None):
        """Mean token cross-entropy over the labels that are not -100 (a scalar)."""
        token_loss = self(input_ids, decoder_input_ids, attention_mask, labels)  # [b, s]
        return masked_mean(token_loss, labels)


def shift_right(labels: np.ndarray, start_token_id: int, pad_token_id: int = 0) -> np.ndarray:
    """Decoder inputs for teacher forcing: ``[start, labels[:, :-1]]`` with -100 -> pad."""
    labels = np.asarray(labels)
    out = np.concatenate([np.full((labels.shape[0], 1), start_token_id, labels.dtype),
                          labels[:, :-1]], 1)  # [b, s]
    return np.where(out == -100, pad_token_id, out).astype(np.int32)


def greedy_generate(model: T5Model, input_ids, attention_mask=None, max_new_tokens: int = 8,
                    eos_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding: encode ``input_ids [b, t]`` once, then feed the decoder
    ``[start, tokens so far]`` and take the argmax of the last position, ``max_new_tokens``
    times (the whole decoder prefix is recomputed each step: no KV cache). After
    ``eos_token_id`` a row continues with the pad id 0, as transformers does. Returns the new
    tokens ``[b, max_new_tokens]`` (int32; the start token is not included)."""
    ids = ms.Tensor(np.asarray(input_ids, np.int32))
    mask = None if attention_mask is None else ms.Tensor(np.asarray(attention_mask, np.int32))
    memory = model.encode(ids, mask)
    b = ids.shape[0]
    out = np.full((b, 1), model.config.decoder_start_token_id, np.int32)
    done = np.zeros(b, bool)
    for _ in range(max_new_tokens):
        logits = model.gather_logits(model.decode(ms.Tensor(out), memory, mask))  # [b, s, V]
        nxt = logits[:, -1].asnumpy()[:, :model.vocab_size].argmax(-1).astype(np.int32)
        nxt = np.where(done, 0, nxt)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        out = np.concatenate([out, nxt[:, None]], 1)
    return out[:, 1:]
