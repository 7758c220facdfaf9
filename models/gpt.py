"""GPTModel: token embedding -> TransformerBlock -> final norm -> output head, whole or as one
pipeline stage.

``GPTModel(config, layer_spec, vocab_size, tie_embeddings=False, groups=None,
pre_process=True, post_process=True, layer_range=None, embedding_group=None, tp_group=None)``:

- ``groups``: the ``mcore.parallel_state.ModelGroups`` every layer uses (``tp``, ``cp``, ``ep``,
  ``etp``; None = single process; ``ModelGroups.from_dims(dims)`` on a job).
  ``tp_group=`` is the older spelling of ``groups=ModelGroups(tp=tp_group)`` (not both).
  ``model.groups`` and ``model.tp_group`` (= ``groups.tp``) record them.
- Parameters are created in ``config.precision.params_dtype`` (router weights stay float32).

- ``embedding``: ``VocabParallelEmbedding`` ``[V/tp, h]`` (only with ``pre_process``).
- ``rotary``: ``RotaryEmbedding`` from ``config.rotary`` (cos/sin computed once per forward,
  on every stage, from the positions; unused by the layers unless
  ``config.position_embedding == "rope"``).
- ``position_embedding``: with ``config.position_embedding == "learned"``, a
  ``LearnedPositionEmbedding`` ``[max_position_embeddings, h]`` (replicated) added to the token
  embedding; ``embedding_norm``: with ``config.embedding_norm``, the config's norm applied to
  the (summed) embedding (Bloom). Both only with ``pre_process``; neither works with sequence
  parallelism yet (refused).
- ``decoder``: ``TransformerBlock`` of ``layer_spec``: layers ``layer_range`` (global indices,
  default all), with its final norm only with ``post_process``.
- ``output_layer``: column-parallel ``h -> V`` (``[V/tp, h]``; a ``NormHead`` with
  ``config.norm_head``), or the embedding weight when ``tie_embeddings`` (only with
  ``post_process``).

``model(input_ids [b, s])`` returns logits ``[b, s, V]`` (gathered over tp). With ``labels``
``[b, s]`` it returns the per-token vocab-parallel cross-entropy ``[b, s]`` instead (logits
stay split over tp): ``loss[:, t]`` scores the logits at position ``t`` against
``labels[:, t]``, with no shift inside the model. For next-token training pass the NEXT tokens,
``input_ids = tokens[:, :-1]``, ``labels = tokens[:, 1:]`` (``training/data/sampler.py`` does);
``labels == -100`` gives 0 at that position (``masked_mean`` skips it).
``position_ids [b, s]`` default to ``offset .. offset + s - 1`` with ``offset`` the cache
length; ``key_mask [b, t]`` marks real (1) vs padding (0) keys; ``cache`` is a ``KVCache``
(PyNative) or ``StaticKVCache`` (also under jit); see ``models.generate``.

**Sequence parallelism** (``config.parallel.sequence_parallel``, Megatron's scheme; with tp of
size one every mapping below is the identity): the embedding reduce-scatters its partial sums
along the sequence, so the hidden state between layers (and between pipeline stages) is
``[b, s/tp, h]``; attention and mlp all-gather it on entry and reduce-scatter on exit; the
norms work on the split sequence (their weights flagged ``param.sequence_parallel``, summed over
tp by ``mcore.distributed.finalize``); the head all-gathers the sequence, so logits, the loss and
``stage_forward``'s last-stage output keep the shapes above. ``s`` must divide by tp. Parameter
names and shapes do not change (checkpoints are interchangeable with a model without it). KV-cache
decoding (``cache``) is refused: it feeds one token at a time; generate with a model built
without sequence parallelism and the same weights (``training/pretrain.py`` does for its sample).

**Mixture of experts** (``config.moe.num_experts > 0``; ``layer_spec`` from
``mcore.transformer.gpt_layer_specs(config)`` or a family's ``moe_layer_specs``):
``model.moe_layers`` lists the global indices of this model's (stage's) MoE layers. The router
losses come back through an explicit channel, never stored on a module:

- ``loss_with_aux(input_ids, labels, position_ids=None, key_mask=None) -> (loss [],
  lm_loss [], aux [L, 3], counts [L, E])``: ``lm_loss = model(input_ids, labels=labels).mean()``
  (the training LossCell's number), ``loss = lm_loss + aux.sum()``; ``aux[i]`` holds the
  coefficient-weighted router losses of layer ``moe_layers[i]`` (columns
  ``mcore.moe.AUX_LOSS_NAMES``), ``counts[i]`` the tokens each expert received on this rank
  (input of ``mcore.moe.update_expert_bias``; for logging).
- ``forward_with_aux(input_ids, position_ids=None, key_mask=None, labels=None) -> (out, aux,
  counts)``: ``out`` is what ``construct`` returns; ``stage_forward_with_aux`` likewise for a
  pipeline stage. Their rows are the decoder's MoE layers only (``decoder.moe_layers``: no
  MTP depth runs there).
- ``construct`` / ``stage_forward`` return the same as for a dense model (router losses
  dropped: generation). A model without MoE layers returns ``aux``/``counts`` as one zero row.

**Multi-token prediction** (``config.mtp.num_layers = D > 0``, ``mcore.transformer.mtp``):
``model.mtp`` holds D extra depths built from ``mtp_layer_spec`` (default: ``layer_spec`` when
it is one spec, else the config's dense ``gpt_layer_spec``); they share the embedding and the
head. ``loss_terms(input_ids, labels, position_ids=None, key_mask=None) -> (loss, lm_loss, aux,
counts, mtp [D])`` adds ``config.mtp.loss_factor * mtp.mean()`` to ``loss`` (so does
``loss_with_aux``); ``construct`` and generation ignore the depths. A depth whose layer is MoE
(``mtp_layer_spec`` with a ``MoELayer`` mlp, e.g. DeepSeek-V3's) counts as layer
``num_layers + d`` of ``model.moe_layers``: its router losses are rows of ``aux`` (in ``loss``
like the decoder's, not scaled by ``loss_factor``) and its expert counts rows of ``counts`` (the
training step's expert-bias update and logs take them like the decoder's). Only a whole model (no
pipeline stages) without sequence parallelism can have them (``ValueError`` otherwise).

**Pipeline stages** (see docs/pipeline_parallel.md, "GPTModel as stages"). A stage holds the
layers ``layer_range`` (built with their GLOBAL ``layer_number``: same initial weights, same
parameter names ``decoder.layers.<global i>.*`` as the full model, so checkpoints and the HF
weight tables apply unchanged).

- ``pre_process=False``: no embedding; the first argument of ``construct`` is the previous
  stage's hidden state ``[b, s, h]`` (``[b, s/tp, h]`` with sequence parallelism) instead of
  token ids.
- ``post_process=False``: no final norm, no head; ``construct`` returns the hidden state
  ``[b, s, h]`` (``[b, s/tp, h]`` with sequence parallelism; ``labels`` must then be None).
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
from functools import partial

import mindspore as ms
from mindspore import nn, ops

from mcore.parallel_state import ModelGroups, ProcessGroup
from mcore.tensor_parallel.cross_entropy import TokenCrossEntropy
from mcore.tensor_parallel.embedding import VocabParallelEmbedding
from mcore.tensor_parallel.layers import ColumnParallelLinear, NormHead
from mcore.tensor_parallel.mappings import (CopyToTPRegion, GatherFromSPRegion,
                                            GatherFromTPRegion)
from mcore.transformer.block import TransformerBlock, check_layer_range
from mcore.transformer.config import TransformerConfig
from mcore.transformer.kv_cache import KVCache
from mcore.transformer.layer_specs import gpt_layer_spec
from mcore.transformer.mtp import MultiTokenPrediction, shift_left
from mcore.transformer.norm import norm_class
from mcore.transformer.positions import LearnedPositionEmbedding
from mcore.transformer.latent_cache import LatentKVCache, StaticLatentKVCache
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
                 tie_embeddings: bool = False, groups: ModelGroups | None = None,
                 pre_process: bool = True, post_process: bool = True,
                 layer_range: range | None = None, embedding_group: ProcessGroup | None = None,
                 tp_group: ProcessGroup | None = None, mtp_layer_spec=None):
        super().__init__()
        groups = ModelGroups.resolve(groups, tp_group, "GPTModel")
        tp_group = groups.tp
        if vocab_size % tp_group.size:
            raise ValueError(f"vocab_size={vocab_size}: must be divisible by tensor parallel "
                             f"size {tp_group.size}")
        sp = config.parallel.sequence_parallel
        if sp and config.moe.num_experts:
            raise NotImplementedError("parallel.sequence_parallel=True with MoE layers "
                                      "(config.moe.num_experts > 0) is not implemented")
        learned = config.position_embedding == "learned"
        if config.norm_head and tie_embeddings:
            raise ValueError("norm_head=True needs an untied output head (tie_embeddings=False)")
        if sp and (learned or config.embedding_norm):
            raise NotImplementedError("parallel.sequence_parallel=True with learned position "
                                      "embeddings or an embedding norm is not implemented")
        self.config, self.vocab_size = config, vocab_size
        self.groups, self.tp_group = groups, tp_group
        dtype = config.params_dtype
        self.tie_embeddings = tie_embeddings
        self.pre_process, self.post_process = bool(pre_process), bool(post_process)
        self.layer_range = check_layer_range(layer_range, config.num_layers)
        self.embedding_group = embedding_group or ProcessGroup.single("embedding")
        # The head's copy of a tied table lives on the last stage under the same name.
        self.embedding = None
        if self.pre_process or (self.post_process and tie_embeddings):
            self.embedding = VocabParallelEmbedding(vocab_size, config.hidden_size, tp_group,
                                                    sequence_parallel=sp and self.pre_process,
                                                    params_dtype=dtype)
            if tie_embeddings and self.pre_process != self.post_process:
                self.embedding.weight.shared_embedding = True
        self.position_embedding = self.embedding_norm = None
        if self.pre_process and learned:
            self.position_embedding = LearnedPositionEmbedding(
                config.max_position_embeddings, config.hidden_size, dtype)
        if self.pre_process and config.embedding_norm:
            self.embedding_norm = norm_class(config.norm)(config.hidden_size, eps=config.norm_eps,
                                                          dtype=dtype, name="embedding_norm")
        self.rotary = RotaryEmbedding(config.rotary, config.rotary_dim)
        self.decoder = TransformerBlock(config, layer_spec, groups=groups,
                                        layer_range=self.layer_range,
                                        post_process=self.post_process)
        self.output_layer = None
        if self.post_process and tie_embeddings:
            # [b, s/tp, h] -> [b, s, h] with sp (partial gradients reduce-scattered back)
            self.enter_head = GatherFromSPRegion(tp_group) if sp else CopyToTPRegion(tp_group)
        elif self.post_process:
            head = NormHead if config.norm_head else partial(ColumnParallelLinear, bias=False)
            self.output_layer = head(config.hidden_size, vocab_size, tp_group,
                                     sequence_parallel=sp, name="output_layer",
                                     params_dtype=dtype)
        self.mtp = None
        if config.mtp.num_layers:
            _check_mtp(config, self.pre_process, self.post_process)
            if mtp_layer_spec is None:  # a dense layer of this model's kind
                mtp_layer_spec = (layer_spec if not isinstance(layer_spec, (list, tuple))
                                  else gpt_layer_spec(config))
            self.mtp = MultiTokenPrediction(config, mtp_layer_spec, groups)
        # rows of loss_terms' aux / counts: the decoder's MoE layers, then the MoE MTP depths
        mtp_moe = () if self.mtp is None else self.mtp.moe_layers
        self.moe_layers = self.decoder.moe_layers + mtp_moe
        self.seq_split = tp_group.size if sp else 1  # the stage input is [b, s/seq_split, h]
        self.gather_logits = GatherFromTPRegion(tp_group)
        # per-token loss [b, s]; at tp=1 the fused cross-entropy (mcore.fusions) where there is one
        self.cross_entropy = TokenCrossEntropy(tp_group) if self.post_process else None
        self.matmul_t = ops.MatMul(transpose_b=True)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write a Hugging Face directory (see ``models.hf.save_pretrained``)."""
        from models.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes)

    def new_cache(self, batch: int | None = None, max_len: int | None = None):
        """An empty KV cache for this model's layers (``layer_range``): a growing ``KVCache``
        (PyNative), or with ``batch`` and ``max_len`` a ``StaticKVCache`` that compiled
        decoding can use (see ``mcore.transformer``). With multi-latent attention the latent
        forms (``LatentKVCache`` / ``StaticLatentKVCache``: ``kv_lora_rank +
        qk_rope_head_dim`` values per token and layer)."""
        cfg = self.config
        if cfg.multi_latent_attention:
            if max_len is None:
                return LatentKVCache(self.layer_range)
            width = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
            return StaticLatentKVCache(self.layer_range, (batch, 1, max_len, width))
        if max_len is None:
            return KVCache(self.layer_range)
        shape = (batch, cfg.local_kv_heads(self.tp_group.size), max_len, cfg.head_dim)
        return StaticKVCache(self.layer_range, shape)

    def _head(self, x):
        if self.output_layer is not None:
            return self.output_layer(x)  # [b, s, h] -> [b, s, V/tp]
        x = self.enter_head(x)  # sp: [b, s/tp, h] -> [b, s, h]
        b, s, h = x.shape
        x = x.reshape(b * s, h)  # [b, s, h] -> [b s, h]
        logits = self.matmul_t(x, self.embedding.weight)  # [b s, h] @ [V/tp, h]^T
        return logits.reshape(b, s, logits.shape[-1])  # -> [b, s, V/tp]

    def stage_forward(self, x, position_ids=None, key_mask=None, cache=None):
        """Token ids ``[b, s]`` (``pre_process``) or hidden state ``[b, s, h]`` -> hidden state
        ``[b, s, h]``, or tp-local logits ``[b, s, V/tp]`` with ``post_process``."""
        x, cos, sin = self._enter(x, position_ids, cache)
        x = self.decoder(x, cos, sin, key_mask, cache)  # [b, s, h]
        if self.post_process:
            x = self._head(x)  # [b, s, h] -> [b, s, V/tp]
        return x

    def stage_forward_with_aux(self, x, position_ids=None, key_mask=None):
        """``stage_forward`` plus the router losses: ``-> (out, aux [L, 3], counts [L, E])``."""
        x, cos, sin = self._enter(x, position_ids, None)
        x, aux, counts = self.decoder.forward_with_aux(x, cos, sin, key_mask)
        if self.post_process:
            x = self._head(x)  # [b, s, h] -> [b, s, V/tp]
        return x, aux, counts

    def _enter(self, x, position_ids, cache):
        """Embedded input (``pre_process``) and the rotary ``cos, sin`` ``[b, 1, s, r]``."""
        b, s = x.shape[0], x.shape[1]
        if not self.pre_process:
            s = s * self.seq_split  # a previous stage's [b, s/tp, h] with sp
        if position_ids is None:
            offset = 0 if cache is None else cache.length
            position_ids = ops.arange(offset, offset + s, 1, dtype=ms.int32).reshape(1, s)
            position_ids = ops.broadcast_to(position_ids, (b, s))  # [1, s] -> [b, s]
        if self.pre_process:
            x = self.embedding(x)  # [b, s] -> [b, s, h]
            if self.position_embedding is not None:
                x = x + self.position_embedding(position_ids)  # + [b, s, h]
            if self.embedding_norm is not None:
                x = self.embedding_norm(x)
        cos, sin = self.rotary(position_ids)  # [b, 1, s, r] each
        return x, cos, sin

    def _finish(self, x, labels):
        if not self.post_process:
            return x  # [b, s, h]
        if labels is not None:
            return self.cross_entropy(x, labels)  # [b, s, V/tp] -> [b, s]
        return self.gather_logits(x)  # [b, s, V/tp] -> [b, s, V]

    def construct(self, input_ids, position_ids=None, key_mask=None, labels=None, cache=None):
        if cache is not None and self.seq_split > 1:
            raise ValueError("GPTModel: KV-cache decoding feeds a few tokens at a time, which "
                             "sequence parallelism cannot split over tp: generate with a model "
                             "built without parallel.sequence_parallel (same weights)")
        if labels is not None and not self.post_process:
            raise ValueError("GPTModel: labels given to a stage without post_process (no head)")
        return self._finish(self.stage_forward(input_ids, position_ids, key_mask, cache), labels)

    def last_logits(self, input_ids, position_ids=None, key_mask=None, cache=None):
        """Logits of the LAST position only, ``[b, V]`` (what generation needs: the head runs
        on ``b`` rows instead of ``b s``); inputs as ``construct``. A whole model or a last
        stage, without sequence parallelism."""
        if self.seq_split > 1 or not self.post_process:
            raise ValueError("GPTModel.last_logits: needs the output head (post_process) and no "
                             "sequence parallelism")
        x, cos, sin = self._enter(input_ids, position_ids, cache)
        x = self.decoder(x, cos, sin, key_mask, cache)  # [b, s, h]
        if x.shape[1] > 1:
            x = x[:, -1:, :]  # [b, s, h] -> [b, 1, h]
        logits = self.gather_logits(self._head(x))  # [b, 1, h] -> [b, 1, V]
        return logits.reshape(logits.shape[0], logits.shape[2])  # [b, 1, V] -> [b, V]

    def forward_with_aux(self, input_ids, position_ids=None, key_mask=None, labels=None):
        """``construct``'s output plus the router losses: ``-> (out, aux [L, 3], counts [L, E])``
        (see the module docstring)."""
        if labels is not None and not self.post_process:
            raise ValueError("GPTModel: labels given to a stage without post_process (no head)")
        x, aux, counts = self.stage_forward_with_aux(input_ids, position_ids, key_mask)
        return self._finish(x, labels), aux, counts

    def loss_with_aux(self, input_ids, labels, position_ids=None, key_mask=None):
        """``-> (loss [], lm_loss [], aux [L, 3], counts [L, E])`` with ``lm_loss`` the mean token
        cross-entropy and ``loss = lm_loss + aux.sum()`` (plus the MTP term with
        ``config.mtp``; see the module docstring)."""
        loss, lm_loss, aux, counts, _ = self.loss_terms(input_ids, labels, position_ids, key_mask)
        return loss, lm_loss, aux, counts

    def loss_terms(self, input_ids, labels, position_ids=None, key_mask=None, denom=None):
        """``-> (loss [], lm_loss [], aux [L, 3], counts [L, E], mtp [D])``: ``loss_with_aux``'s
        terms plus the per-depth multi-token-prediction losses (``mcore.transformer.mtp``;
        one 0 without MTP); ``loss = lm_loss + aux.sum() + loss_factor * mtp.mean()``.
        ``denom`` (packed sequences, fp32 []): ``lm_loss`` and each depth's loss are their
        token-loss sums / ``denom`` (``training.packed_loss``), and a depth's target at ``t``
        counts only if ``key_mask[t + k] == key_mask[t]`` (same packed sample)."""
        if not self.post_process:
            raise ValueError("GPTModel: labels given to a stage without post_process (no head)")
        x, cos, sin = self._enter(input_ids, position_ids, None)
        x, aux, counts = self.decoder.forward_with_aux(x, cos, sin, key_mask)  # x: final-normed
        token_loss = self.cross_entropy(self._head(x), labels)  # [b, s, V/tp] -> [b, s]
        lm_loss = token_loss.mean() if denom is None else token_loss.sum() / denom
        loss = lm_loss + aux.sum()
        if self.mtp is None:
            return loss, lm_loss, aux, counts, ops.zeros((1,), ms.float32)
        mtp, mtp_aux, mtp_counts = self._mtp_losses(x, input_ids, labels, cos, sin, key_mask,
                                                    denom)
        if mtp_aux:  # MoE depths: rows num_layers + d after the decoder's (model.moe_layers)
            mtp_aux, mtp_counts = ops.stack(mtp_aux), ops.stack(mtp_counts)  # [M, 3], [M, E]
            loss = loss + mtp_aux.sum()
            if self.decoder.moe_layers:
                aux, counts = ops.concat((aux, mtp_aux), 0), ops.concat((counts, mtp_counts), 0)
            else:  # the decoder's one zero row is not a layer
                aux, counts = mtp_aux, mtp_counts
        return loss + self.mtp.loss_factor * mtp.mean(), lm_loss, aux, counts, mtp

    def _mtp_losses(self, hidden, input_ids, labels, cos, sin, key_mask, denom=None):
        """``(losses [D], aux, counts)`` from the main model's head input ``hidden [b, s, h]``:
        the per-depth MTP losses and the MoE depths' router losses ``[3]`` / counts ``[E]``
        (tuples, one per MoE depth). With ``denom`` (packed): sums / ``denom``, targets only
        inside a position's own segment of ``key_mask``."""
        losses, auxes, counts = (), (), ()
        for k, layer in enumerate(self.mtp.layers, start=1):
            ids = shift_left(input_ids, k, 0)  # token t + k at t
            target = shift_left(labels, k, -100)  # token t + k + 1 at t
            if denom is not None and key_mask is not None:  # no target across a sample boundary
                same = ops.equal(shift_left(key_mask, k, -1), key_mask)  # [b, s]
                target = ops.select(same, target, ops.full_like(target, -100))
            if layer.is_moe:
                hidden, aux, count = layer.forward_with_aux(hidden, self.embedding(ids), cos, sin,
                                                            key_mask)  # [b, s, h]
                auxes += (aux,)
                counts += (count,)
            else:
                hidden = layer(hidden, self.embedding(ids), cos, sin, key_mask)  # [b, s, h]
            token_loss = self.cross_entropy(self._head(hidden), target)  # [b, s]
            if denom is None:
                valid = (target != -100).astype(ms.float32)  # [b, s]
                losses += (token_loss.sum() / ops.maximum(valid.sum(), 1.0),)
            else:
                losses += (token_loss.sum() / denom,)
        return ops.stack(losses), auxes, counts  # D x [] -> [D]


def _check_mtp(config: TransformerConfig, pre_process: bool, post_process: bool) -> None:
    """Multi-token prediction needs the embedding and the head on one stage, and the whole
    sequence (no sequence parallelism)."""
    D = config.mtp.num_layers
    if not (pre_process and post_process):
        raise ValueError(f"mtp.num_layers={D}: multi-token prediction needs the embedding and "
                         "the output head on one stage; pipeline parallelism is not supported "
                         "with it")
    if config.parallel.sequence_parallel:
        raise ValueError(f"mtp.num_layers={D}: multi-token prediction with sequence "
                         "parallelism is not implemented")
