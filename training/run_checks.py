"""The checks a training run makes on its config before any work (each a ``ConfigError`` with
one line naming the key): what the loop supports (``check_supported``), sizes the model build
would reject (``check_model``), the tokenizer against the model's vocabulary
(``check_tokenizer_file``, ``check_vocab``) and the compute precision (``precision``).
``training/pretrain.py`` and ``training/finetune.py`` call them at parse time.
"""
from __future__ import annotations

from pathlib import Path

from mcore.distributed_env import requested_device
from training.config import ConfigError


def check_supported(cfg, tokenizer: bool = True) -> None:
    """Refuse what this loop does not implement yet, and any size the model build would reject
    later (``training.model_bridge.transformer_config``), naming the key (a ``ConfigError``).
    ``tokenizer=False``: the caller checks ``data.tokenizer`` itself (``training/finetune.py``)."""
    from training.context_parallel import check_cp

    p = cfg.parallel
    check_cp(cfg)
    if p.sp and p.tp > 1 and cfg.model.moe.num_experts:
        raise ConfigError("parallel.sp=true: sequence parallelism with MoE layers "
                          "(model.moe.num_experts > 0) is not implemented (set it to false)")
    if cfg.model.moe.num_experts:
        if p.pp != 1 and p.tp != 1:
            raise ConfigError(f"parallel.tp={p.tp}, parallel.pp={p.pp}: training/pretrain.py trains MoE "
                              "models (model.moe.num_experts > 0) with tp or pp, not both, for now "
                              "(set one of them to 1)")
        if cfg.model.moe.dispatcher == "alltoall" and cfg.training.mode == "graph":
            raise ConfigError("model.moe.dispatcher=alltoall runs eagerly only: use allgather "
                              "with training.mode=graph, or training.mode=pynative")
    precision(cfg)
    check_model(cfg)
    if tokenizer:
        check_tokenizer_file(cfg)
    from training.lora import check_lora

    check_lora(cfg)


def check_model(cfg) -> None:
    """Build the run's ``TransformerConfig`` (no weights) so that a size the model would reject
    fails now, as a ``ConfigError`` naming the key."""
    from mcore.pipeline_parallel.stage import split_layers
    from training.model_bridge import config_error, model_vocab, transformer_config

    p = cfg.parallel
    tcfg = transformer_config(cfg)
    try:
        tcfg.check_tp(p.tp)
    except ValueError as exc:
        raise ConfigError(f"parallel.tp={p.tp}: {config_error(exc)}") from None
    if cfg.model.hf_path:  # the directory's sizes were not seen by the config checks
        vocab = model_vocab(cfg)  # ChatGLM: padded_vocab_size (models.hf.vocab_size_of)
        if vocab % p.tp:
            raise ConfigError(f"model.hf_path: vocab_size={vocab!r} of its config.json is not "
                              f"divisible by parallel.tp={p.tp}")
        try:
            split_layers(tcfg.num_layers, p.pp, p.vpp, p.layers_per_stage)
        except ValueError as exc:
            raise ConfigError(f"model.hf_path: its {tcfg.num_layers} layers vs parallel.pp="
                              f"{p.pp}, parallel.vpp={p.vpp}: {exc}") from None


def check_tokenizer_file(cfg) -> None:
    """The one check of the run's tokenizer, before any data or model work (``ConfigError``
    naming the key): a given ``data.tokenizer`` must be a tokenizer.json with no more tokens
    than the model's vocabulary (``model.vocab_size``, or ``model.hf_path``'s); without one the
    run trains a byte-level BPE of that many tokens (never more), which needs at least
    ``MIN_BPE_VOCAB``."""
    from training.model_bridge import model_vocab, vocab_key

    path = cfg.data.tokenizer
    if path is None:
        from training.data.tokenizer import MIN_BPE_VOCAB

        vocab = model_vocab(cfg)
        if cfg.data.data_prefix is None and vocab < MIN_BPE_VOCAB:
            raise ConfigError(f"{vocab_key(cfg)}={vocab}: without data.tokenizer the run trains a "
                              f"byte-level BPE tokenizer, which needs >= {MIN_BPE_VOCAB} tokens")
        return
    try:
        is_file = Path(path).is_file()
    except (OSError, ValueError):  # e.g. a NUL byte in the name
        is_file = False
    if not is_file:
        raise ConfigError(f"data.tokenizer: {path!r} is not a file")
    from training.data.tokenizer import load_tokenizer

    try:
        size = load_tokenizer(path).vocab_size
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise ConfigError(f"data.tokenizer: '{path}' is not a tokenizer.json "
                          f"({type(exc).__name__})") from None
    check_vocab(cfg, size, path)


def check_vocab(cfg, tokenizer_size: int, source: str = "the tokenizer") -> None:
    """The model's vocabulary (``model.vocab_size``, or ``model.hf_path``'s) must hold every
    token id of the tokenizer (``ConfigError``)."""
    from training.model_bridge import model_vocab, vocab_key

    if tokenizer_size > model_vocab(cfg):
        raise ConfigError(f"{vocab_key(cfg)}={model_vocab(cfg)} is smaller than {source}'s "
                          f"{tokenizer_size} tokens")


def precision(cfg, device: str | None = None) -> tuple[str, float]:
    """``(compute dtype "fp32" | "fp16" | "bf16", loss scale)`` for ``training.dtype`` and
    ``training.loss_scale`` on ``device`` (default: this run's); ``ConfigError`` naming the key if
    the device cannot compute in that dtype (bf16 on CPU) or the scale is not positive."""
    t = cfg.training
    dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(t.dtype, t.dtype)
    device = device or requested_device()
    if dtype == "bf16" and device.upper() == "CPU":
        raise ConfigError(f"training.dtype={t.dtype}: MindSpore 2.10 has no bf16 compute kernels "
                          "on CPU; use fp32 or fp16")
    scale = t.loss_scale if t.loss_scale is not None else (1024.0 if dtype == "fp16" else 1.0)
    if not scale > 0:
        raise ConfigError(f"training.loss_scale must be > 0, got {scale}")
    return dtype, float(scale)
