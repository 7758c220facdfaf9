"""This rank's tensor-parallel shard of a served model (``training/serve.py`` under msrun).

``load_shard(src, dims)``: ``src`` a ``training.generate.Source``, ``dims`` a
``ParallelDims`` whose only parallel dimension is tp. A Hugging Face directory loads through
``models.from_pretrained(dims=...)``; a training checkpoint of any layout (tp, pp, ep / etp,
sp) is rebuilt as a dense GPT over ``dims``' groups and each parameter's tp shard is read
through ``mcore.checkpoint`` with the spec training itself would use
(``training.checkpoint_layout.param_entries``). LoRA checkpoints are refused (merge the
adapters first, docs/lora.md); multi-token-prediction depths are left out, as in
``training/generate.py``.
"""
from __future__ import annotations


def load_shard(src, dims):
    import mindspore as ms

    import models
    from mcore.checkpoint import load_tensors
    from mcore.parallel_state import ModelGroups
    from training.checkpoint_layout import param_entries
    from training.checkpointing import read_meta
    from training.config import ConfigError, config_from_dict
    from training.model_bridge import build_gpt

    if src.kind == "hf":
        return models.from_pretrained(src.path, dims=dims)
    meta = read_meta(src.path)
    cfg = config_from_dict(meta["meta"]["config"], world_size=meta["world_size"])
    if cfg.lora.enabled:
        raise ConfigError(f"{src.path}: a LoRA checkpoint is served on one process only; merge "
                          "the adapters into the weights (docs/lora.md) to serve it with tp > 1")
    cfg.model.mtp.num_layers = 0
    cfg.parallel.sp = False  # decoding feeds one token at a time: no sequence split
    model = build_gpt(cfg, groups=ModelGroups.from_dims(dims))
    entries = param_entries([model], dims)
    params = dict(model.parameters_and_names())
    weights = load_tensors(src.path, {n: entries[n].spec for n in params}, meta)
    for name, param in params.items():
        param.set_data(ms.Tensor(weights[name], param.dtype))
    return model
