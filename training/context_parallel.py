"""Context parallelism (``parallel.cp`` > 1) in the training loop: what the loop supports, and
each rank's part of a micro-batch.

With ``cp`` ranks per data-parallel replica, every sequence of a micro-batch is split over the
cp group (``mcore.context_parallel``: ``2 cp`` chunks, rank r holds chunks r and 2cp-1-r).
``cp_micro_batch`` gives a rank its input ids, labels (the loss mask: ``-100`` entries travel
with them) and the position ids of the tokens it holds, which the model turns into the rotary
cos/sin of those positions. The attention layers exchange keys and values over cp
(``parallel.cp_comm``, ``mcore.transformer.context_parallel``); everything else in a layer is
per token and needs nothing. Each rank's loss is the mean over its ``s / cp`` tokens of every
sequence (the same count on every rank), so the mean of the cp ranks' losses is the loss of the
whole sequences, and the gradients end as a sum over the ``dp x cp`` ranks divided by
``dp * cp`` (``mcore.distributed.finalize``; the distributed optimizer shards over dp x cp).
cp ranks hold replicas of the weights, like dp ranks: checkpoints are written by cp rank 0
and load on any layout.
"""
from __future__ import annotations

import numpy as np

from mcore.context_parallel import cp_position_ids, split_for_cp
from training.config import ConfigError


def check_cp(cfg) -> None:
    """``ConfigError`` naming the key for what the loop does not run with ``parallel.cp`` > 1:
    pipeline parallelism, MoE layers, multi-token prediction, multi-latent attention, ALiBi,
    LoRA. (``model.seq_length`` divisible by ``2*parallel.cp`` and the a2a head counts are
    checked with the config, ``training.config_validate``.)"""
    p, m = cfg.parallel, cfg.model
    if p.cp == 1:
        return
    lead = f"parallel.cp={p.cp}:"
    if p.pp > 1:
        raise ConfigError(f"{lead} context parallelism with pipeline parallelism (parallel.pp="
                          f"{p.pp}) is not implemented (set one of them to 1)")
    if m.moe.num_experts:
        raise ConfigError(f"{lead} context parallelism with MoE layers (model.moe.num_experts="
                          f"{m.moe.num_experts}) is not implemented")
    if m.mtp.num_layers:
        raise ConfigError(f"{lead} context parallelism with multi-token prediction "
                          f"(model.mtp.num_layers={m.mtp.num_layers}) is not implemented")
    if cfg.lora.enabled:
        raise ConfigError(f"{lead} context parallelism with LoRA (lora.enabled) is not "
                          "implemented")
    from training.model_bridge import transformer_config

    tcfg = transformer_config(cfg)
    source = f"model.hf_path={m.hf_path}" if m.hf_path else f"model.family={m.family}"
    if tcfg.multi_latent_attention:
        raise ConfigError(f"{lead} context parallelism with multi-latent attention ({source}) "
                          "is not implemented")
    if tcfg.position_embedding == "alibi":
        raise ConfigError(f"{lead} context parallelism with ALiBi positions ({source}) is not "
                          "implemented")


def cp_micro_batch(batch, cp_group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs, labels)`` numpy ``[b, s]`` -> this cp rank's ``(inputs, labels, position_ids)``
    ``[b, s/cp]`` int32. Packed batches (4-tuples with segment ids) are refused
    (``ValueError``): the cp attention schemes take whole causal sequences."""
    if len(batch) != 2:
        raise ValueError("context parallelism takes (inputs, labels) micro-batches; packed "
                         "samples (segment ids) are not supported with parallel.cp > 1")
    inputs, labels = (np.asarray(x, np.int32) for x in batch)
    cp, rank = cp_group.size, cp_group.rank
    b, s = inputs.shape
    return (split_for_cp(inputs, cp, rank), split_for_cp(labels, cp, rank),
            cp_position_ids(b, s, cp, rank))
