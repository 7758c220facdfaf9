"""Learning-rate schedule and weight-decay mask: pure Python, shared by every optimizer.

Schedule (``lr_at``), for step ``s`` counted from 0, warmup ``W``, decay end ``D``::

    s <  W          lr * (s + 1) / W                       linear warmup (never exactly 0)
    W <= s < D      min_lr + (lr - min_lr) * f(p),   p = (s - W) / (D - W)
                        cosine:   f = (1 + cos(pi p)) / 2
                        linear:   f = 1 - p
                        constant: f = 1   (lr, not min_lr)
    s >= D          min_lr   (constant: lr)

Weight decay (``should_decay``): decay matrices, not biases or normalisation weights. A parameter
is exempt when its name ends in ``bias`` or its last name component mentions a norm (``norm``,
``layernorm``, ``ln_``), or when it has fewer than 2 dimensions (if ``ndim`` is given).
"""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
          decay_style: str = "cosine") -> float:
    """Learning rate for (0-based) optimizer step ``step``; see the module docstring."""
    if decay_style not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown decay_style {decay_style!r} (cosine, linear or constant)")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_iters > 0 and step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if decay_style == "constant":
        return lr
    if step >= decay_iters or decay_iters <= warmup_iters:
        return min_lr
    p = (step - warmup_iters) / (decay_iters - warmup_iters)
    f = 0.5 * (1.0 + math.cos(math.pi * p)) if decay_style == "cosine" else 1.0 - p
    return min_lr + (lr - min_lr) * f


def lr_schedule(opt_cfg, train_iters: int):
    """``step -> lr`` for an ``OptimizerConfig`` (decay ends at ``decay_iters`` or ``train_iters``)."""
    decay = opt_cfg.decay_iters if opt_cfg.decay_iters is not None else train_iters

    def schedule(step: int) -> float:
        return lr_at(step, opt_cfg.lr, opt_cfg.min_lr, opt_cfg.warmup_iters, decay, opt_cfg.decay_style)

    return schedule


def should_decay(name: str, ndim: int | None = None) -> bool:
    """Whether weight decay applies to the parameter called ``name`` (of ``ndim`` dimensions)."""
    if ndim is not None and ndim < 2:
        return False
    leaf = name.lower().replace("/", ".").split(".")
    last = leaf[-1]
    owner = leaf[-2] if len(leaf) > 1 else ""
    if last.endswith("bias"):
        return False
    return not any("norm" in part or part.startswith("ln_") or part == "ln" for part in (last, owner))


def split_decay(names_and_ndims) -> tuple[list[str], list[str]]:
    """Partition ``[(name, ndim), ...]`` (or plain names) into ``(decay, no_decay)`` name lists."""
    decay, no_decay = [], []
    for item in names_and_ndims:
        name, ndim = (item, None) if isinstance(item, str) else item
        (decay if should_decay(name, ndim) else no_decay).append(name)
    return decay, no_decay
