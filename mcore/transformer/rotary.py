"""Rotary position embedding (RoPE): frequencies, scaling variants, and application.

``inverse_frequencies(config, head_dim)`` returns the ``rotary_dim / 2`` inverse frequencies
and the cos/sin multiplier ("attention factor") for the configured scaling:

- none:   ``inv_freq_i = base ** (-2i / rotary_dim)``
- linear: ``inv_freq / factor`` (position interpolation)
- llama3: Llama-3.1 bands. With wavelength ``w = 2 pi / inv_freq`` and ``L`` the original
  context: ``w > L / low_freq_factor`` -> ``inv_freq / factor``; ``w < L / high_freq_factor``
  -> unchanged; in between a linear blend with weight ``(L / w - low) / (high - low)``.
- yarn:   per-dim blend of interpolated ``inv_freq / factor`` and extrapolated ``inv_freq``
  with a linear ramp between the correction dims of ``beta_fast`` and ``beta_slow``
  rotations; cos and sin are multiplied by ``0.1 ln(factor) + 1`` (or the configured factor).

Layouts: "half-split" rotates pairs ``(i, i + r/2)`` (Llama, Qwen); "interleaved" rotates
pairs ``(2i, 2i + 1)`` (GLM). Partial rotary rotates the first ``rotary_dim`` dims of each head.

``apply_rotary`` is the composed reference; ``ApplyRotary`` (a Cell, built once per layer) uses
the fused "rotary" op of ``mcore.fusions`` for float32 inputs when the device has one.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from mcore.fusions.registry import fused_cell
from mcore.transformer.config import RotaryConfig


def _llama3(inv_freq: np.ndarray, cfg: RotaryConfig) -> np.ndarray:
    low_wavelen = cfg.original_max_position / cfg.low_freq_factor
    high_wavelen = cfg.original_max_position / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (cfg.original_max_position / wavelen - cfg.low_freq_factor) / (
        cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rot: int, cfg: RotaryConfig) -> tuple[np.ndarray, float]:
    def correction_dim(rotations):
        return rot * math.log(cfg.original_max_position / (rotations * 2 * math.pi)) / (
            2 * math.log(cfg.base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rot // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1.0 - ramp
    pos_freqs = cfg.base ** (np.arange(0, rot, 2, dtype=np.float32) / rot)
    inv_freq = (1.0 / (cfg.factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs) * extrapolation_weight
    if cfg.attention_factor is not None:
        factor = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        factor = _yarn_mscale(cfg.factor, cfg.mscale) / _yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    else:
        factor = _yarn_mscale(cfg.factor)
    return inv_freq, factor


def inverse_frequencies(cfg: RotaryConfig, rotary_dim: int) -> tuple[np.ndarray, float]:
    """``(inv_freq [rotary_dim / 2] float32, attention_factor)`` for ``cfg``."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    inv_freq = (1.0 / (cfg.base ** exponent)).astype(np.float32)
    factor = 1.0
    if cfg.scaling == "linear":
        inv_freq = inv_freq / cfg.factor
    elif cfg.scaling == "llama3":
        inv_freq = _llama3(inv_freq, cfg)
    elif cfg.scaling == "yarn":
        inv_freq, factor = _yarn(rotary_dim, cfg)
    return inv_freq.astype(np.float32), float(factor)


class RotaryEmbedding(nn.Cell):
    """Positions ``[b, s]`` (int) -> ``(cos, sin)``, each ``[b, 1, s, rotary_dim]`` (fp32).

    The last dim is laid out for ``apply_rotary``: halves ``[f0..f(r/2-1), f0..f(r/2-1)]`` or
    interleaved ``[f0, f0, f1, f1, ...]``.
    """

    def __init__(self, cfg: RotaryConfig, rotary_dim: int):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(cfg, rotary_dim)
        if cfg.interleaved:
            inv_freq = np.repeat(inv_freq, 2)  # [r/2] -> [r]: f0 f0 f1 f1 ...
        else:
            inv_freq = np.concatenate([inv_freq, inv_freq])  # [r/2] -> [r]: halves
        self.inv_freq = Tensor(inv_freq.reshape(1, 1, -1), ms.float32)  # [1, 1, r]

    def construct(self, position_ids):
        pos = position_ids.astype(ms.float32)
        angles = ops.expand_dims(pos, -1) * self.inv_freq  # [b, s, 1] * [1, 1, r] -> [b, s, r]
        angles = ops.expand_dims(angles, 1)  # [b, s, r] -> [b, 1, s, r]
        return ops.cos(angles) * self.attention_factor, ops.sin(angles) * self.attention_factor


def _rotate_half(x):
    x1, x2 = ops.split(x, x.shape[-1] // 2, -1)
    return ops.cat((-x2, x1), -1)


def _rotate_interleaved(x):
    shape = x.shape
    pairs = x.reshape(shape[:-1] + (shape[-1] // 2, 2))  # [..., r] -> [..., r/2, 2]
    rotated = ops.stack((-pairs[..., 1], pairs[..., 0]), -1)  # [..., r/2, 2]
    return rotated.reshape(shape)  # [..., r/2, 2] -> [..., r]


def apply_rotary(x, cos, sin, interleaved: bool = False):
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` [b, n, s, d]; the rest pass through."""
    rot, d = cos.shape[-1], x.shape[-1]
    if rot == d:
        x_rot, x_pass = x, None
    else:
        x_rot, x_pass = ops.split(x, (rot, d - rot), -1)
    turned = _rotate_interleaved(x_rot) if interleaved else _rotate_half(x_rot)
    out = x_rot * cos.astype(x.dtype) + turned * sin.astype(x.dtype)
    if x_pass is None:
        return out
    return ops.cat((out, x_pass), -1)


class ApplyRotary(nn.Cell):
    """``apply_rotary`` as a Cell: ``(x [b, n, s, d], cos, sin [b or 1, 1, s, r]) -> [b, n, s, d]``.

    ``fused``: None = the registry decides (float32 inputs only), False = composed. The fused
    op treats cos and sin as constants (zero gradient), as positions are.
    """

    def __init__(self, interleaved: bool = False, fused: bool | None = None):
        super().__init__()
        self.interleaved = bool(interleaved)
        kernel = fused_cell("rotary", fused, interleaved=self.interleaved)
        self.use_kernel = kernel is not None
        if self.use_kernel:
            self.kernel = kernel

    def construct(self, x, cos, sin):
        if self.use_kernel and x.dtype == ms.float32 and cos.dtype == ms.float32:
            return self.kernel(x, cos, sin)
        return apply_rotary(x, cos, sin, self.interleaved)
