"""LoRA on a ``GPTModel`` by Hugging Face module names, saved and loaded in PEFT's layout.

    info = apply_lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    ...train (only the adapters have requires_grad)...
    save_adapter(model, "out/adapter")       # adapter_config.json + adapter_model.safetensors
    load_adapter(model2, "out/adapter")      # same adapters on another model (any tp size)
    merge_lora(model); model.save_pretrained("out/merged")

Module names are the Hugging Face ones of the model's weight table (``models.weights``): the
tensor ``model.layers.0.self_attn.q_proj.weight`` names the module
``model.layers.0.self_attn.q_proj``. A ``target_modules`` list matches a module whose name
equals an entry or ends with ``"." + entry`` (PEFT's rule: ``q_proj`` matches every layer's
q projection); a single string is a regular expression that must match the whole name. A
fused layer (``linear_qkv`` = q/k/v, ``linear_fc1`` = gate/up) gets one adapter per matched HF
module. Layers whose HF tensor is a strided part of a fused tensor (e.g. ``gate_up_proj``) and
MoE experts cannot be targeted. The math and the tp layout: ``mcore.tensor_parallel.lora``.

PEFT tensors: ``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight``
[out, r], float32. Every entry of ``target_modules`` must match at least one module, ``r`` > 0
and ``0 <= dropout < 1``: else ``ValueError`` naming ``target_modules`` / ``r`` / ``dropout``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import mindspore as ms

from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.tensor_parallel.lora import attach_lora, full_part, merge_lora_into
from models.errors import LoadError
from models.safetensors_io import read_header, write_safetensors

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json keys of PEFT variants not implemented here, with the plain LoRA value.
UNSUPPORTED = {"use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
               "modules_to_save": None, "lora_bias": False}


@dataclass
class LoRAInfo:
    """What ``apply_lora`` did: settings and ``modules`` ``{hf_module: (base layer, part
    index)}`` in model order."""

    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | str
    modules: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def linear_modules(model) -> dict[str, tuple[object, int]]:
    """Every targetable HF module of ``model``: ``{hf_module: (base layer, fused part index)}``
    (from the family's weight table)."""
    table = model.hf.family.weight_table(model.config, model.hf.tie)
    out = {}
    for name, cell in model.cells_and_names():
        if not isinstance(cell, (ColumnParallelLinear, RowParallelLinear)):
            continue
        pieces = table.get(f"{name}.weight", ())
        parts = cell.partitions or (cell.output_size,)
        if len(pieces) != len(parts) or any(p.count != 1 or p.groups != 1 for p in pieces):
            continue  # strided parts of one HF tensor: not a separate HF module
        for j, piece in enumerate(pieces):
            out[piece.name.removesuffix(".weight")] = (cell, j)
    return out


def match_modules(names, target_modules: list[str] | str, strict: bool = True) -> list[str]:
    """The names matched by ``target_modules`` (see the module doc); ``ValueError`` naming
    ``target_modules`` if it is empty or (``strict``) an entry matches nothing. ``strict=False``
    (a pipeline stage holds part of the modules): matching nothing is allowed."""
    names = list(names)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(target_modules, str):
        found = [n for n in names if re.fullmatch(target_modules, n)]
        if not found and strict:
            raise ValueError(f"target_modules={target_modules!r}: the pattern matches no module "
                             f"(module names end in {leaves})")
        return found
    if not target_modules:
        raise ValueError("target_modules: empty (name at least one module, e.g. q_proj)")
    found = []
    for entry in target_modules:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits and strict:
            raise ValueError(f"target_modules: {entry!r} matches no module (module names end "
                             f"in {leaves})")
        found += [n for n in hits if n not in found]
    return [n for n in names if n in found]


def apply_lora(model, r: int, alpha: float, target_modules: list[str] | str,
               dropout: float = 0.0, strict: bool = True) -> LoRAInfo:
    """Attach adapters to the modules ``target_modules`` names and freeze every other parameter
    (``requires_grad = False``); record the result as ``model.lora`` and return it.
    ``strict=False`` (a pipeline stage): an entry may match none of this model's modules."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r}: the LoRA rank must be an integer > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
    if getattr(model, "lora", None) is not None:
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora first)")
    available = linear_modules(model)
    chosen = match_modules(available, target_modules, strict)
    info = LoRAInfo(r, float(alpha), float(dropout), target_modules,
                    {n: available[n] for n in chosen})
    for p in model.get_parameters():
        p.requires_grad = False
    by_layer: dict[int, tuple[object, list[int]]] = {}
    for cell, j in info.modules.values():
        by_layer.setdefault(id(cell), (cell, []))[1].append(j)
    for cell, parts in by_layer.values():
        attach_lora(cell, tuple(parts), r, alpha, dropout)
    for name, p in model.parameters_and_names():
        if ".lora." in name:
            p.name = name  # unique names for the optimizer (MindSpore keeps the short ones)
    model.lora = info
    return info


def _part(info: LoRAInfo, module: str):
    cell, j = info.modules[module]
    return cell, cell.lora.parts[cell.lora.slots[j]]


def trainable_summary(model) -> dict:
    """``{"trainable", "total", "fraction"}`` parameter counts on this rank."""
    params = list(model.get_parameters())
    total = sum(int(np.prod(p.shape)) for p in params)
    trainable = sum(int(np.prod(p.shape)) for p in params if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


def adapter_state(model) -> dict[str, np.ndarray]:
    """PEFT-named full adapter tensors (gathered over tp; collective over the tp group)."""
    from mcore.comm import all_gather

    info, out = model.lora, {}
    for module in info.modules:
        cell, part = _part(info, module)
        for tensor in ("lora_A", "lora_B"):
            value, dim = getattr(part, tensor).value(), part.shard_dims[tensor]
            if dim is not None and cell.group.size > 1:
                value = all_gather(value, cell.group, dim)  # shards -> full along dim
            out[f"{PEFT_PREFIX}{module}.{tensor}.weight"] = value.asnumpy()
    return out


def adapter_config(model, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` contents of ``model``'s adapters."""
    info = model.lora
    targets = info.target_modules if isinstance(info.target_modules, str) \
        else sorted({m.rsplit(".", 1)[-1] for m in info.modules})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": info.r,
            "lora_alpha": info.alpha, "lora_dropout": info.dropout, "target_modules": targets,
            "base_model_name_or_path": base_model_name_or_path, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "revision": None}


def save_adapter(model, path, base_model_name_or_path: str | None = None) -> None:
    """Write ``path/adapter_config.json`` and ``path/adapter_model.safetensors``. Collective over
    the tp group; tp rank 0 writes."""
    if getattr(model, "lora", None) is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    tensors = adapter_state(model)
    if model.tp_group.rank != 0:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_FILE, tensors)
    config = adapter_config(model, base_model_name_or_path)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_adapter_config(path) -> dict:
    """``path/adapter_config.json``; ``LoadError`` naming the file if it is missing, not JSON,
    not LoRA, or a PEFT variant not implemented here (``UNSUPPORTED``, naming the key)."""
    file = Path(path) / CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{file}: cannot read the adapter config ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LoadError(f"{file}: peft_type is not 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise LoadError(f"{file}: missing key {key!r}")
    for key, plain in UNSUPPORTED.items():  # PEFT variants this loader does not implement
        if config.get(key, plain) not in (plain, None):
            raise LoadError(f"{file}: {key}={config[key]!r} is not supported (only {plain!r})")
    return config


def load_adapter(model, path, strict: bool = True) -> LoRAInfo:
    """Attach the adapters saved in ``path`` (PEFT layout) to ``model`` (any tp size) and set
    their values; ``LoadError`` naming the file (and tensor) for a bad config, a missing or a
    misshapen tensor. ``strict=False``: ``model`` is a pipeline stage (``apply_lora``); it
    reads the tensors of its own modules."""
    config = read_adapter_config(path)
    try:
        info = apply_lora(model, int(config["r"]), float(config["lora_alpha"]),
                          config["target_modules"], float(config.get("lora_dropout") or 0.0),
                          strict)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{Path(path) / CONFIG_FILE}: {exc}") from None
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise LoadError(f"{file}: missing")
    tensors = read_header(file)
    for module in info.modules:
        cell, part = _part(info, module)
        for tensor in ("lora_A", "lora_B"):
            name = f"{PEFT_PREFIX}{module}.{tensor}.weight"
            if name not in tensors:
                raise LoadError(f"{file}: missing tensor {name!r}")
            value = full_part(part, tensor, cell.group.size, cell.group.rank,
                              tensors[name].load().astype(np.float32))
            param = getattr(part, tensor)
            if tuple(value.shape) != tuple(param.shape):
                raise LoadError(f"{file}: tensor {name!r} has shape {tensors[name].shape}, "
                                f"which does not fit r={info.r} and the model")
            param.set_data(ms.Tensor(value, ms.float32))
    return info


def merge_lora(model) -> None:
    """Fold every adapter into its base weight (``W += alpha/r * B A``, local: no communication),
    remove the adapters and make every parameter trainable again (a plain model, ready for
    ``save_pretrained``). Rebuild any compiled graph of the model afterwards."""
    info = getattr(model, "lora", None)
    if info is None:
        return
    for cell, _ in {id(c): (c, j) for c, j in info.modules.values()}.values():
        merge_lora_into(cell)
    for p in model.get_parameters():
        p.requires_grad = True
    model.lora = None
