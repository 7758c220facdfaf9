"""Hugging Face checkpoints: ``from_pretrained(dir)`` and ``save_pretrained(model, dir)``.

A directory holds ``config.json`` and ``model.safetensors`` (or shards with
``model.safetensors.index.json``). ``model_type`` picks the family file (``FAMILIES``); the
family maps the config to a ``TransformerConfig`` and names the weights (``models.weights``).
With a tp group of size > 1 every rank reads only its shard of each tensor; with an ep group
of size > 1 (``groups.ep``, MoE families) every rank reads only its experts' tensors, sliced
over the etp group (``groups.etp``), and ``save_pretrained`` gathers the experts back over etp
and ep.
With ``stage=StageSpec(pre_process, post_process, layer_range)`` the model is one pipeline
stage (``models.gpt``) and reads only the tensors that stage holds (the tied head copy of a
last stage from ``embed_tokens``); ``full_state`` then returns that stage's parameters.
Families: ``FAMILIES`` maps ``model_type`` to a family module (``MODEL_TYPES``, ``TIE_DEFAULT``,
``config_from_hf``, ``layer_spec``, ``weight_table``). ``register_family(module)`` adds one; the
package ``legacy`` registers the older families when imported. A ``model_type`` that is not
registered makes ``family_of`` import ``legacy`` (by name: ``models`` does not depend on it) and
look again, so ``from_pretrained`` finds a legacy family without the caller importing anything.
A family may set ``BASE_PREFIX`` (its weight names' prefix, e.g. ``"transformer."``: a
checkpoint of the base model without it is renamed on load) and ``IGNORED_SUFFIXES`` (buffers
older checkpoints saved, e.g. GPT-2's ``.attn.bias`` causal mask) and ``ignored_tensor(cfg,
name, names)`` (checkpoint tensors strict loading accepts unused: DeepSeek-V3's MTP layer) and
``vocab_size(hf)`` (the vocabulary when config.json names it otherwise: ChatGLM's
``padded_vocab_size``; ``vocab_size_of``).
Errors: unknown ``model_type``, an override that is not a config key, or a shape mismatch
each raise one error naming the key or tensor. Faults of the files raise ``models.LoadError``
naming the file and tensor: ``config.json`` missing, not JSON or lacking a required key; a bad
safetensors header or index (``models.safetensors_io``); a tensor the model needs that is
missing; tensors the model does not use (e.g. a config with fewer layers than the checkpoint;
``strict=False`` ignores them); NaN or Inf in a weight.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import mindspore as ms
import numpy as np

from mcore.parallel_state import ModelGroups, ParallelDims, ProcessGroup
from models import deepseek_v2, deepseek_v3, glm, llama, mixtral, qwen, qwen3_moe, telechat
from models.errors import LoadError
from models.gpt import GPTModel, StageSpec
from models.safetensors_io import read_checkpoint, write_checkpoint
from models.weights import split_dims, to_hf, to_local

FAMILIES: dict[str, ModuleType] = {t: fam for fam in (llama, qwen, glm, telechat, mixtral,
                                                        qwen3_moe, deepseek_v3, deepseek_v2)
                                   for t in fam.MODEL_TYPES}
# Keys an override may add although config.json does not have them.
_OPTIONAL_KEYS = {"rope_scaling", "rope_parameters", "head_dim", "tie_word_embeddings",
                  "partial_rotary_factor", "attention_bias", "output_router_logits",
                  "router_aux_loss_coef", "use_mtp"}
_MTP_TYPES = {"deepseek_v3", "deepseek_v2"}  # read use_mtp (V2 refuses it naming the key)


@dataclass
class HFInfo:
    """What ``save_pretrained`` needs to write a model back: family and config.json contents."""

    family: ModuleType
    config: dict
    tie: bool


_FAMILY_API = ("MODEL_TYPES", "TIE_DEFAULT", "config_from_hf", "layer_spec", "weight_table")
LEGACY_PACKAGE = "legacy"


def register_family(module: ModuleType) -> None:
    """Make ``module`` the family of each of its ``MODEL_TYPES`` (``ValueError`` naming the
    missing attribute, or a ``model_type`` another module already holds)."""
    missing = [a for a in _FAMILY_API if not hasattr(module, a)]
    if missing:
        raise ValueError(f"register_family({module.__name__}): missing {missing}")
    for kind in module.MODEL_TYPES:
        if FAMILIES.get(kind, module) is not module:
            raise ValueError(f"register_family({module.__name__}): model_type {kind!r} is "
                             f"already {FAMILIES[kind].__name__}")
        FAMILIES[kind] = module


def family_of(hf: dict) -> ModuleType:
    """The family module of a HF config's ``model_type``; an unregistered one imports the
    ``legacy`` package (which registers the older families) and looks again."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        import importlib

        try:
            importlib.import_module(LEGACY_PACKAGE)
        except ImportError as exc:
            raise ValueError(f"model_type={kind!r} is not one of {sorted(FAMILIES)}, and the "
                             f"package {LEGACY_PACKAGE!r} that holds the older families could "
                             f"not be imported: {exc}") from None
    if kind not in FAMILIES:
        raise ValueError(f"model_type={kind!r} is not supported (supported: {sorted(FAMILIES)})")
    return FAMILIES[kind]


def vocab_size_of(hf: dict, family: ModuleType | None = None) -> int:
    """The vocabulary (embedding rows) of a HF config: the family's ``vocab_size(hf)`` when it
    has one, else ``vocab_size``."""
    family = family or family_of(hf)
    return family.vocab_size(hf) if hasattr(family, "vocab_size") else hf["vocab_size"]


def build_from_config(hf: dict, tp_group: ProcessGroup | None = None,
                      stage: StageSpec | None = None, *,
                      embedding_group: ProcessGroup | None = None,
                      groups: ModelGroups | None = None) -> GPTModel:
    """A randomly initialised ``GPTModel`` for a HF config dict (no weights read); with
    ``stage``, only that pipeline stage (``embedding_group``: ``dims.embedding``, recorded on
    the model for the tied-embedding gradient sum). ``groups``: the model's ``ModelGroups``
    (``tp_group=`` is the older spelling of ``groups=ModelGroups(tp=tp_group)``)."""
    groups = ModelGroups.resolve(groups, tp_group, "build_from_config")
    family = family_of(hf)
    cfg = family.config_from_hf(hf)
    tie = bool(hf.get("tie_word_embeddings", family.TIE_DEFAULT))
    if hasattr(family, "build_model"):  # not a decoder-only GPTModel (encoders, encoder-decoders)
        if stage is not None and stage != StageSpec.full(cfg.num_layers):
            raise ValueError(f"model_type {hf.get('model_type')!r}: no pipeline stages "
                             f"(the model is built whole)")
        model = family.build_model(hf, cfg, tie=tie, groups=groups)
        model.hf = HFInfo(family, dict(hf), tie)
        return model
    stage = stage or StageSpec.full(cfg.num_layers)
    model = GPTModel(cfg, family.layer_spec(cfg), vocab_size_of(hf, family), tie_embeddings=tie,
                     groups=groups, pre_process=stage.pre_process,
                     post_process=stage.post_process, layer_range=stage.layer_range,
                     embedding_group=embedding_group,
                     mtp_layer_spec=(family.mtp_layer_spec(cfg) if cfg.mtp.num_layers
                                     and hasattr(family, "mtp_layer_spec") else None))
    model.hf = HFInfo(family, dict(hf), tie)
    return model


def _groups(tp_group, dims, groups) -> ModelGroups:
    given = [n for n, v in (("tp_group", tp_group), ("dims", dims), ("groups", groups))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"from_pretrained: pass one of tp_group, dims, groups (got {given})")
    if dims is not None:
        return ModelGroups.from_dims(dims)
    return ModelGroups.resolve(groups, tp_group, "from_pretrained")


def read_config(path: Path) -> dict:
    """``path/config.json`` as a dict; ``LoadError`` naming the file if missing or not JSON."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{config_file}: missing (not a Hugging Face checkpoint directory?)")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise LoadError(f"{config_file}: not a JSON object")
    return hf


def from_pretrained(path, tp_group: ProcessGroup | None = None, dims: ParallelDims | None = None,
                    stage: StageSpec | None = None, strict: bool = True, *,
                    groups: ModelGroups | None = None, **overrides) -> GPTModel:
    """Load a HF checkpoint directory; ``overrides`` replace config.json keys; ``stage``: build
    and load only that pipeline stage; ``strict=False``: ignore checkpoint tensors the model does
    not use (else ``LoadError`` listing them). Groups: one of ``dims`` (its
    ``ModelGroups.from_dims``), ``groups`` or the older ``tp_group``; none = single process."""
    path = Path(path)
    config_file = path / "config.json"
    hf = read_config(path)
    for key, value in overrides.items():
        if key not in hf and key not in _OPTIONAL_KEYS:
            raise KeyError(f"override {key!r} is not a key of {config_file}")
        if key == "use_mtp" and hf.get("model_type") not in _MTP_TYPES:
            raise KeyError(f"override 'use_mtp': model_type={hf.get('model_type')!r} has no "
                           f"multi-token prediction layers (only {sorted(_MTP_TYPES)})")
        hf[key] = value
    model_groups = _groups(tp_group, dims, groups)
    tensors = read_checkpoint(path)  # headers only: file faults surface before the model is built
    if hf.get("model_type") is not None:
        tensors = add_base_prefix(family_of(hf), tensors)
    try:
        model = build_from_config(hf, stage=stage, groups=model_groups,
                                  embedding_group=dims.embedding if dims is not None else None)
    except KeyError as exc:
        raise LoadError(f"{config_file}: missing required key {exc.args[0]!r}") from None
    check_names(model, tensors, path, strict)
    load_weights(model, tensors)
    return model


# Checkpoint tensors that are buffers rather than weights (older transformers saved them).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def add_base_prefix(family: ModuleType, tensors: dict) -> dict:
    """``tensors`` renamed ``<family.BASE_PREFIX><name>`` when the family has a base prefix and
    no tensor carries it: checkpoints saved from the base model rather than the LM class
    (GPT-2 and BLOOM on the Hub name ``h.0.attn.c_attn.weight``, not
    ``transformer.h.0...``)."""
    prefix = getattr(family, "BASE_PREFIX", None)
    if not prefix or any(n.startswith(prefix) for n in tensors):
        return tensors
    return {(n if n.startswith("lm_head.") else prefix + n): t for n, t in tensors.items()}


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def check_names(model: GPTModel, tensors: dict, path: Path, strict: bool = True) -> None:
    """``LoadError`` naming ``path`` if a tensor ``model``'s stage needs is missing, or (``strict``)
    if the checkpoint holds tensors the full model does not use (another stage's are fine)."""
    needed = {p.name for plist in stage_table(model).values() for p in plist}
    missing = sorted(needed - set(tensors))
    if missing:
        raise LoadError(f"{path}: checkpoint is missing tensor(s) {_listing(missing)}")
    if not strict:
        return
    used = {p.name for plist in model.hf.family.weight_table(model.config, model.hf.tie).values()
            for p in plist}
    if model.hf.tie:
        used.add("lm_head.weight")  # a tied head saved anyway is the embedding again
    ignored = _IGNORED_SUFFIXES + tuple(getattr(model.hf.family, "IGNORED_SUFFIXES", ()))
    skip = getattr(model.hf.family, "ignored_tensor", None)
    unexpected = sorted(n for n in set(tensors) - used if not n.endswith(ignored)
                        and not (skip and skip(model.config, n, tensors)))
    if unexpected:
        raise LoadError(f"{path}: {len(unexpected)} tensor(s) the model does not use: "
                        f"{_listing(unexpected)} (num_hidden_layers={model.config.num_layers}; "
                        "from_pretrained(..., strict=False) ignores them)")


def _stage_holds(model: GPTModel, name: str) -> bool:
    """Whether a parameter of the full model belongs to ``model``'s pipeline stage (a model a
    family's ``build_model`` made, which has no ``layer_range``, holds every parameter)."""
    if not hasattr(model, "layer_range"):
        return True
    if name.startswith("decoder.layers."):
        return int(name.split(".")[2]) in model.layer_range
    if name.startswith(("position_embedding.", "embedding_norm.")):
        return model.pre_process
    if name.startswith("embedding."):  # first stage; with tied embeddings also the last
        return model.embedding is not None
    return model.post_process  # final norm, output layer


def stage_table(model: GPTModel) -> dict:
    """The family's weight table restricted to what ``model`` (maybe one pipeline stage) holds:
    layers of its ``layer_range``; embedding / final norm / head where it has them."""
    table = model.hf.family.weight_table(model.config, model.hf.tie)
    return {name: plist for name, plist in table.items() if _stage_holds(model, name)}


def load_weights(model: GPTModel, tensors: dict) -> None:
    """Set every parameter from HF ``tensors`` (name -> LazyTensor) on this tp / ep rank; only
    the tensors of the model's stage (and of this ep rank's experts) are read."""
    params = dict(model.parameters_and_names())
    table = stage_table(model)
    group = model.tp_group
    etp = model.groups.etp
    values = to_local(table, tensors, {n: tuple(p.shape) for n, p in params.items()},
                      split_dims(model), group.size, group.rank, ep_rank=model.groups.ep.rank,
                      etp=etp.size, etp_rank=etp.rank)
    for name, value in values.items():
        params[name].set_data(ms.Tensor(value, params[name].dtype))


def full_state(model: GPTModel) -> dict[str, np.ndarray]:
    """Every parameter at full size: split parameters are gathered over the tp group (rank
    shards concatenated along their split dim; fused q/k/v and gate/up are reordered by
    ``models.weights.to_hf``), expert parameters (``param.expert``) over the etp group along
    their split dim, then over the ep group (all experts, in global order). Collective over
    the tp, etp and ep groups."""
    from mcore.comm import all_gather

    dims, groups, out = split_dims(model), model.groups, {}
    for name, param in model.parameters_and_names():
        dim = dims.get(name)
        value = param.value()
        expert = getattr(param, "expert", False)
        group = groups.etp if expert else model.tp_group
        if dim is not None and group.size > 1:
            value = all_gather(value, group, dim)  # [.., n/tp, ..] -> [.., n, ..]
        if expert and groups.ep.size > 1:
            value = all_gather(value, groups.ep, 0)  # [E/ep, in, out] -> [E, in, out]
        out[name] = value.asnumpy()
    return out


def save_pretrained(model: GPTModel, path, max_shard_bytes: int | None = None) -> None:
    """Write ``model`` as a HF directory (float32 safetensors + config.json) that transformers
    loads. Collective over the tp, etp and ep groups; the rank that is 0 in all three writes."""
    info = getattr(model, "hf", None)
    if info is None:
        raise ValueError("save_pretrained: model has no Hugging Face config (build it with "
                         "from_pretrained or build_from_config)")
    staged = hasattr(model, "layer_range")  # a family's build_model makes whole models
    if staged and not (model.pre_process and model.post_process
                       and len(model.layer_range) == model.config.num_layers):
        raise ValueError(f"save_pretrained: model is one pipeline stage (pre_process="
                         f"{model.pre_process}, post_process={model.post_process}, layer_range="
                         f"{model.layer_range}); merge the stages' full_state first")
    state = full_state(model)
    if model.tp_group.rank != 0 or model.groups.ep.rank != 0 or model.groups.etp.rank != 0:
        return
    tensors = to_hf(info.family.weight_table(model.config, info.tie), state, split_dims(model),
                    model.tp_group.size, model.groups.etp.size)
    path = Path(path)
    write_checkpoint(path, tensors, max_shard_bytes)
    config = dict(info.config)
    config["torch_dtype"] = config["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
