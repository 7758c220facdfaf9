"""The ``lora`` config section in the training loop: checked at parse time, applied where the
model is built (``training.pretrain.build_model``), so every entry point that builds its model
there (pretrain, evaluate, finetune) trains or evaluates the adapters.

With ``lora.enabled`` the model's weights (from ``model.hf_path``, or the seeded initial weights)
are frozen and adapters are attached to the modules ``lora.target_modules`` names
(``models.peft.apply_lora``; or loaded from ``lora.load``, a PEFT directory). Only trainable
parameters reach the training step: ``TrainStep`` / the distributed optimizer / the gradient
finaliser see the adapters alone (no moments, no gradient buffers for the frozen weights), and a
checkpoint holds the adapters (the frozen weights come from ``model.hf_path`` again on resume).
At the end of a run the adapters are written in PEFT's layout to ``<logging.output_dir>/adapter``.
"""
from __future__ import annotations

from pathlib import Path

from training.config_validate import ConfigError

DEFAULT_TARGETS = ["q_proj", "v_proj"]


def targets(cfg) -> list[str]:
    """``lora.target_modules`` or the default (q_proj, v_proj)."""
    return list(cfg.lora.target_modules) if cfg.lora.target_modules is not None \
        else list(DEFAULT_TARGETS)


def _module_names(cfg, experts: bool = False) -> list[str]:
    """HF names of the model's linear layers (from the family's weight table, no weights);
    ``experts``: the MoE experts' modules instead (which LoRA does not adapt)."""
    from training.model_bridge import hf_dir_config, transformer_config

    if cfg.model.hf_path:
        tcfg, family, hf = hf_dir_config(cfg)
        tie = bool(hf.get("tie_word_embeddings", family.TIE_DEFAULT))
    else:
        from models.hf import FAMILIES
        from training.model_bridge import hf_config

        hf = hf_config(cfg.model)
        tcfg, family, tie = transformer_config(cfg), FAMILIES[hf["model_type"]], \
            cfg.model.tie_word_embeddings
    names = []
    for pname, plist in family.weight_table(tcfg, tie).items():
        if experts:
            for stack in getattr(plist, "experts", ()):
                names += [p.name.removesuffix(".weight") for p in stack]
            continue
        module = pname.rsplit(".", 2)
        is_linear = pname == "output_layer.weight" or (len(module) == 3 and module[1].startswith(
            "linear_") and module[2] == "weight")
        if not is_linear or not isinstance(plist, tuple):
            continue
        if all(p.count == 1 and p.groups == 1 for p in plist):
            names += [p.name.removesuffix(".weight") for p in plist]
    return names


def check_lora(cfg) -> None:
    """Refuse a bad ``lora`` section before any work (``ConfigError`` naming the key): ``r``,
    ``alpha``, ``dropout`` out of range, a ``target_modules`` entry that matches no module of
    the model or that matches MoE expert weights, ``load`` without its adapter_config.json."""
    lo = cfg.lora
    if lo.r <= 0:
        raise ConfigError(f"lora.r={lo.r}: the LoRA rank must be > 0")
    if not lo.alpha > 0:
        raise ConfigError(f"lora.alpha={lo.alpha}: must be > 0")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout={lo.dropout}: must be in [0, 1)")
    if not lo.enabled:
        return
    if lo.load is not None:
        if not (Path(lo.load) / "adapter_config.json").is_file():
            raise ConfigError(f"lora.load: '{lo.load}' has no adapter_config.json")
        return
    from models.peft import match_modules

    if experts := match_modules(_module_names(cfg, experts=True), targets(cfg), strict=False):
        raise ConfigError(f"lora.target_modules={targets(cfg)} matches MoE expert weights "
                          f"({experts[0]}, ...): LoRA on experts is not implemented (target "
                          "attention, dense or shared-expert modules, e.g. with a regex string)")
    try:
        match_modules(_module_names(cfg), targets(cfg))
    except ValueError as exc:
        raise ConfigError(f"lora.{exc}") from None


def apply_config(cfg, model, log=None, stage: bool = False) -> dict | None:
    """Attach the ``lora`` section's adapters to ``model`` (freezing the rest); log and return
    ``models.peft.trainable_summary`` (None when LoRA is off). ``log``: a ``str -> None``.
    ``stage``: ``model`` is one pipeline stage (``training.lora_stages``): it adapts the
    matched modules it holds, and must hold at least one (``ConfigError`` otherwise)."""
    if not cfg.lora.enabled:
        return None
    from models.errors import LoadError
    from models.peft import apply_lora, load_adapter, trainable_summary

    lo = cfg.lora
    try:
        if lo.load is not None:
            info = load_adapter(model, lo.load, strict=not stage)
        else:
            info = apply_lora(model, lo.r, lo.alpha, targets(cfg), lo.dropout, strict=not stage)
    except LoadError as exc:
        raise ConfigError(f"lora.load: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"lora.{exc}") from None
    if not info.modules:
        raise ConfigError(f"lora.target_modules={targets(cfg)}: the pipeline stage of layers "
                          f"{list(model.decoder.layer_range)} holds none of them; with "
                          "parallel.pp > 1 every stage needs an adapted module")
    summary = trainable_summary(model)
    summary["modules"] = len(info.modules)
    if log is not None:
        log(lora_line(summary, info))
    return summary


def lora_line(summary: dict, info) -> str:
    """The start-of-run line: adapters, trainable count and share, and the frozen-base cost.

    Per token a full fine-tuning step costs ~6 N FLOPs (forward 2 N, backward 2 N for the
    activation gradients + 2 N for the weight gradients); with frozen weights the backward
    skips the weight gradients of the N - n frozen parameters: ~4 N + 2 n."""
    n, total = summary["trainable"], summary["total"]
    ratio = (4 * total + 2 * n) / (6 * total)
    return (f"lora: r {info.r}, alpha {info.alpha:g}, dropout {info.dropout:g} on "
            f"{summary['modules']} modules; {n:,} trainable of {total:,} parameters on this rank "
            f"({100 * summary['fraction']:.3f}%); frozen base: step FLOPs ~{ratio:.2f}x "
            "full fine-tuning (no weight gradients for frozen weights)")


def save_adapter_dir(cfg, model) -> Path | None:
    """Write the adapters to ``<logging.output_dir>/adapter`` (PEFT layout); collective over tp
    (and over pp for a pipeline: ``training.lora_stages.save_stage_adapters``)."""
    if not cfg.lora.enabled:
        return None
    out = Path(cfg.logging.output_dir) / "adapter"
    if hasattr(model, "chunk_models"):
        from training.lora_stages import save_stage_adapters

        save_stage_adapters(model, out, base_model_name_or_path=cfg.model.hf_path)
        return out
    if getattr(model, "lora", None) is None:
        return None
    from models.peft import save_adapter

    save_adapter(model, out, base_model_name_or_path=cfg.model.hf_path)
    return out


def model_from_checkpoint(path: Path, cfg, world_size: int):
    """A one-process model of a LoRA run's checkpoint ``path`` (``cfg``: the run's config): the
    frozen weights as training built them (``model.hf_path``, or the seeded initial weights,
    which do not depend on the layout) and the checkpoint's adapters, read as whole tensors
    whatever layout saved them (``mcore.checkpoint``). The adapters stay attached
    (``models.peft.merge_lora`` folds them in). ``world_size`` is unused (kept for callers)."""
    import mindspore as ms

    from mcore.checkpoint import ShardSpec, load_tensors
    from models.hf import load_weights
    from models.safetensors_io import read_checkpoint
    from training.checkpointing import read_meta, tensor_kinds
    from training.model_bridge import build_gpt

    model = build_gpt(cfg)
    if cfg.model.hf_path:
        load_weights(model, read_checkpoint(cfg.model.hf_path))
    apply_config(cfg, model)
    meta = read_meta(path)
    params = dict(model.parameters_and_names())
    names = [n for n, kind in tensor_kinds(meta).items() if kind == "model"]
    values = load_tensors(path, {n: ShardSpec.whole(params[n].shape) for n in names}, meta)
    for name, value in values.items():
        params[name].set_data(ms.Tensor(value, ms.float32))
    return model
