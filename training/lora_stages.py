"""LoRA on a pipeline (``parallel.pp > 1``): each stage adapts the modules it holds.

``training.pretrain.build_model`` passes ``training.lora.apply_config(cfg, model, stage=True)``
as ``build_pipeline``'s ``prepare``: every chunk's model gets its weights, then its adapters
(the matched modules among its own layers; a stage with none is a ``ConfigError``), before its
runner takes the trainable parameters, so the frozen base has no gradients, no buffers and no
moments on any stage and each stage trains its own adapters.

- ``summary(model)``: ``(trainable_summary, LoRAInfo)`` of a ``GPTModel`` or of this rank's
  chunks together (the start-of-run log line);
- ``save_stage_adapters(pipeline, path)``: ONE PEFT directory for the whole model. Every rank
  gathers its chunks' adapters over tp (``models.peft.adapter_state``), then the pp group
  exchanges the tensor names and shapes and sums the values into one flat buffer (each module
  lives on exactly one stage); the rank of tp, pp and dp rank 0 writes. Collective over tp and
  pp (every rank calls).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mindspore as ms
import numpy as np

from mcore.comm.collectives import all_gather, all_reduce


def _models(model) -> list:
    return list(model.chunk_models) if hasattr(model, "chunk_models") else [model]


def summary(model) -> tuple[dict, object]:
    """``({"trainable", "total", "fraction", "modules"}, LoRAInfo)`` over ``model``'s chunks on
    this rank (the info of the first chunk, with every chunk's modules)."""
    from models.peft import LoRAInfo, trainable_summary

    parts = [trainable_summary(m) for m in _models(model)]
    trainable, total = sum(p["trainable"] for p in parts), sum(p["total"] for p in parts)
    first = _models(model)[0].lora
    modules = {k: v for m in _models(model) for k, v in m.lora.modules.items()}
    info = LoRAInfo(first.r, first.alpha, first.dropout, first.target_modules, modules)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1),
            "modules": len(modules)}, info


def _exchange_names(local: dict, pp) -> list[tuple[str, tuple]]:
    """Every stage's ``(name, shape)`` pairs, sorted (the names travel as padded bytes)."""
    mine = json.dumps(sorted((n, list(v.shape)) for n, v in local.items())).encode()
    size = all_reduce(ms.Tensor([len(mine)], ms.float32), pp, op="max")
    width = int(size.asnumpy()[0])
    codes = np.zeros(width, np.float32)
    codes[:len(mine)] = np.frombuffer(mine, np.uint8)
    every = all_gather(ms.Tensor(codes), pp, 0).asnumpy().reshape(pp.size, width)  # [pp * w] -> [pp, w]
    out = set()
    for row in every:
        text = row.astype(np.uint8).tobytes().rstrip(b"\0").decode()
        out.update((n, tuple(shape)) for n, shape in json.loads(text))
    return sorted(out)


def gather_stage_adapters(pipeline) -> dict[str, np.ndarray]:
    """The PEFT-named adapter tensors of the whole model on every rank (see the module doc)."""
    from models.peft import adapter_state

    local = {}
    for m in pipeline.chunk_models:
        local.update(adapter_state(m))
    pp = pipeline.dims.pp
    if pp.size == 1:
        return local
    names = _exchange_names(local, pp)
    sizes = [int(np.prod(shape)) for _, shape in names]
    flat = np.zeros(sum(sizes), np.float32)
    start = 0
    for (name, _), n in zip(names, sizes):
        if name in local:
            flat[start:start + n] = local[name].reshape(-1)
        start += n
    flat = all_reduce(ms.Tensor(flat), pp).asnumpy()  # each tensor is non-zero on one stage
    out, start = {}, 0
    for (name, shape), n in zip(names, sizes):
        out[name] = flat[start:start + n].reshape(shape)  # [n] -> shape
        start += n
    return out


def save_stage_adapters(pipeline, path, base_model_name_or_path=None) -> None:
    """Write ``path/adapter_config.json`` and ``path/adapter_model.safetensors`` for the whole
    model from a pipeline's stages (collective over tp and pp; one rank writes)."""
    from models.peft import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, adapter_config
    from models.safetensors_io import write_safetensors

    tensors = gather_stage_adapters(pipeline)
    dims = pipeline.dims
    if dims.tp.rank or dims.pp.rank or dims.dp.rank:
        return
    _, info = summary(pipeline)
    suffix = ".lora_A.weight"
    info.modules = {n[len(PEFT_PREFIX):-len(suffix)]: None for n in tensors if n.endswith(suffix)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_FILE, tensors)
    config = adapter_config(SimpleNamespace(lora=info), base_model_name_or_path)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
