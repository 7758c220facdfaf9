"""A GPTModel split into pipeline stages: this rank's chunks, ready for the schedules.

    pipeline = build_gpt_pipeline(hf_config, dims, vpp=2, layers_per_stage=[2, 1, 1, 1])
    fb = get_forward_backward_func(dims.pp.size, vpp=2)
    result = fb(forward_step, data_iterator, pipeline, num_microbatches, seq_length, mbs)
    grads = pipeline.sync_embedding_grads(result.grads)     # tied embeddings; no-op otherwise
    for chunk, chunk_grads in zip(pipeline.chunks, grads):  # the optimizer, local chunks only
        ...                                                  # update with ops.assign

Contract of ``build_gpt_pipeline(hf_config, dims, vpp=1, layers_per_stage=None, jit=True,
hf_path=None) -> GPTPipelineModel`` (a ``mcore.pipeline_parallel.stage.PipelineModel``):

- Layout: virtual stage ``v = chunk * pp + dims.pp_stage``; its layers are
  ``split_layers(num_layers, pp, vpp, layers_per_stage)[v]`` (global indices). Virtual stage
  0 embeds token ids (``pre_process``), the last one (``pp * vpp - 1``) runs the final norm,
  the head and the loss (``post_process``). Each chunk is a ``StageRunner`` over a
  ``PipelineStage`` of one ``GPTStage`` Cell, i.e. one ``GPTModel`` stage instance
  (``chunk_models[c]``), built with ``ModelGroups.from_dims(dims)``.
- Loss (last virtual stage): mean token cross-entropy, vocab-parallel over tp: the same number
  as ``model(x, labels=labels).mean()`` of the full model (``training.step.LossCell``).
  Packed sequences (the schedules' ``stage_inputs``): every stage takes ``position_ids`` and
  ``key_mask`` (``GPTModel.stage_forward``) and the loss is the token-loss sum / ``denom``.
- Activations between stages: ``[micro_batch, seq, hidden]`` float32, ``[micro_batch,
  seq / tp, hidden]`` when the stages are built with ``config.parallel.sequence_parallel``
  (``PipelineModel.sequence_parallel``, read from the first chunk's config).
- Mixture of experts: a chunk whose model has MoE layers (``chunk_models[c].moe_layers``) is a
  ``with_aux`` stage: its router losses (``aux [L, 3]``, coefficient-weighted) join the training
  loss with their gradient added in that stage's own backward, and ``ScheduleResult.aux[c]``
  holds ``(aux, counts [L, E])`` per micro-batch (rows: ``chunk_models[c].moe_layers``). The
  reported loss is the language-model loss. Expert parameters keep ``param.expert``; the
  experts are split over ``dims.ep`` (ranks of one pipeline stage).
- Names: ``chunk_models[c].parameters_and_names()`` gives the full model's names
  (``decoder.layers.<global i>.*``, ``embedding.weight``, ``decoder.final_norm.weight``,
  ``output_layer.weight``); ``param_names[c][i]`` names ``chunks[c].params[i]`` (and so
  ``result.grads[c][i]``). ``Parameter.name`` itself carries wrapper prefixes: do not use it.
- Initial weights equal the full model's (``build_from_config`` with the same config), or
  with ``hf_path`` are read from that Hugging Face directory: each chunk reads only its tensors
  (``hf_config`` None: the directory's config.json).
- ``build_pipeline(make_stage, num_layers, dims, ...)`` is the same without a HF config: each
  chunk is ``make_stage(StageSpec)`` (e.g. a ``GPTModel`` of a ``TransformerConfig``).
- Tied embeddings (``tie_word_embeddings``, pp > 1): the first and the last stage each hold a
  copy named ``embedding.weight`` marked ``shared_embedding``; ``sync_embedding_grads(grads)``
  sums their gradients over ``dims.embedding`` (call it on every rank, every step, before the
  optimizer and before gradient clipping; count the copy once in a global norm).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mindspore import nn

from mcore.parallel_state import ModelGroups, ParallelDims, ProcessGroup
from mcore.pipeline_parallel.stage import (PipelineModel, PipelineStage, StageRunner,
                                           split_layers, sync_embedding_grads)
from mcore.tensor_parallel.cross_entropy import TokenCrossEntropy
from models.gpt import GPTModel, StageSpec
from models.hf import build_from_config, check_names, family_of, load_weights
from models.safetensors_io import read_checkpoint

__all__ = ["StageSpec", "GPTStage", "VocabParallelMeanLoss", "GPTPipelineModel",
           "stage_specs", "build_gpt_pipeline", "build_pipeline"]


class GPTStage(nn.Cell):
    """One GPTModel stage as a pipeline Cell: token ids ``[b, s]`` or hidden ``[b, s, h]`` ->
    hidden ``[b, s, h]``, or tp-local logits ``[b, s, V/tp]`` on the last stage. ``with_aux``
    (a stage holding MoE layers): ``-> (out, aux [L, 3], counts [L, E])`` of its own MoE layers
    (``GPTModel.stage_forward_with_aux``)."""

    def __init__(self, model: GPTModel, with_aux: bool = False):
        super().__init__()
        self.model, self.with_aux = model, bool(with_aux)

    def construct(self, x, position_ids=None, key_mask=None):
        if self.with_aux:
            return self.model.stage_forward_with_aux(x, position_ids, key_mask)
        return self.model.stage_forward(x, position_ids, key_mask)


class VocabParallelMeanLoss(nn.Cell):
    """``(logits [b, s, V/tp], labels [b, s]) -> mean token cross-entropy`` (scalar); with
    ``denom`` (packed sequences, fp32 []): the sum of the token losses / ``denom`` (labels
    -100 count 0; ``training.packed_loss``)."""

    def __init__(self, tp_group: ProcessGroup):
        super().__init__()
        self.tp_group = tp_group
        self.cross_entropy = TokenCrossEntropy(tp_group)  # fused at tp=1 (mcore.fusions)

    def construct(self, logits, labels, denom=None):
        loss = self.cross_entropy(logits, labels)  # [b, s, V/tp] -> [b, s]
        if denom is None:
            return loss.mean()  # [b, s] -> []
        return loss.sum() / denom  # [b, s] -> []


@dataclass
class GPTPipelineModel(PipelineModel):
    """``PipelineModel`` plus the GPTModel stage instances behind the chunks (see the module
    docstring): ``chunk_models[c]``, ``stages[c]`` (its ``StageSpec``), ``param_names[c]``."""

    chunk_models: list = field(default_factory=list)
    stages: list = field(default_factory=list)
    param_names: list = field(default_factory=list)

    def sync_embedding_grads(self, grads: list) -> list:
        """``grads`` (one tuple per local chunk, e.g. ``ScheduleResult.grads``) with the tied
        embedding copies' gradients summed over ``dims.embedding`` (collective: call on every
        rank). Chunks without gradients (None, forward only) are passed through."""
        return [g if g is None else sync_embedding_grads(tuple(g), self.dims, chunk.params)
                for chunk, g in zip(self.chunks, grads)]


def stage_specs(num_layers: int, pp: int, vpp: int = 1, layers_per_stage=None) -> list:
    """``StageSpec`` of every virtual stage ``v = chunk * pp + rank`` (``pp * vpp`` of them)."""
    ranges = split_layers(num_layers, pp, vpp, layers_per_stage)
    last = len(ranges) - 1
    return [StageSpec(v == 0, v == last, r) for v, r in enumerate(ranges)]


def _names(model: GPTModel, params) -> list:
    by_id = {id(p): name for name, p in model.parameters_and_names()}
    return [by_id[id(p)] for p in params]


def build_gpt_pipeline(hf_config: dict | None, dims: ParallelDims, vpp: int = 1,
                       layers_per_stage=None, jit: bool = True,
                       hf_path=None) -> GPTPipelineModel:
    """This rank's chunks of the GPTModel of ``hf_config`` (see the module docstring)."""
    if hf_config is None:
        if hf_path is None:
            raise ValueError("build_gpt_pipeline: pass hf_config or hf_path")
        hf_config = json.loads((Path(hf_path) / "config.json").read_text())
    num_layers = family_of(hf_config).config_from_hf(hf_config).num_layers
    tensors = read_checkpoint(hf_path) if hf_path is not None else None

    def make_stage(spec: StageSpec) -> GPTModel:
        return build_from_config(hf_config, stage=spec, groups=ModelGroups.from_dims(dims),
                                 embedding_group=dims.embedding)

    return build_pipeline(make_stage, num_layers, dims, vpp, layers_per_stage, jit, tensors,
                          source=hf_path)


def build_pipeline(make_stage, num_layers: int, dims: ParallelDims, vpp: int = 1,
                   layers_per_stage=None, jit: bool = True, tensors=None,
                   source=None, prepare=None) -> GPTPipelineModel:
    """This rank's chunks, each ``make_stage(spec) -> GPTModel`` for its ``StageSpec`` (built
    with ``ModelGroups.from_dims(dims)`` and ``embedding_group=dims.embedding``; e.g. from a ``TransformerConfig``,
    as ``training.model_bridge.build_gpt`` does); ``tensors``: HF tensors to load (None: keep
    the initial weights; a tensor a chunk needs that is missing, or one the full model does not
    use, is a ``LoadError`` naming ``source``); ``prepare(model)``: called on each chunk's
    model after its weights are loaded and before its runner takes the trainable parameters
    (e.g. LoRA: freeze the weights, attach adapters)."""
    pp, rank = dims.pp.size, dims.pp_stage
    specs = stage_specs(num_layers, pp, vpp, layers_per_stage)
    chunks, models, mine, names = [], [], [], []
    for c in range(vpp):
        spec = specs[c * pp + rank]
        model = make_stage(spec)
        if tensors is not None:
            check_names(model, tensors, Path(source or "tensors"))
            load_weights(model, tensors)
        if prepare is not None:
            prepare(model)
        loss = VocabParallelMeanLoss(dims.tp) if spec.post_process else None
        aux = bool(model.moe_layers)
        runner = StageRunner(PipelineStage([GPTStage(model, with_aux=aux)], loss_fn=loss,
                                           is_first=spec.pre_process, with_aux=aux), jit=jit)
        chunks.append(runner)
        models.append(model)
        mine.append(spec)
        names.append(_names(model, runner.params))
    config = models[0].config
    return GPTPipelineModel(chunks, dims, config.hidden_size,
                            sequence_parallel=config.parallel.sequence_parallel,
                            chunk_models=models, stages=mine, param_names=names)
