"""Shared pieces of the MLA tests: a tiny config, a net around one MLA layer, random full
weights (sharded for any tp size) and an independent float64 numpy reference of the layer.

The reference is written from the math (DeepSeek-V2 paper / Hugging Face's description), not
from ``mcore.transformer.mla``: rotary as complex multiplication of interleaved pairs, YaRN
frequencies from the ramp definition, DeepSeek's mscale terms, causal softmax attention.
MindSpore is imported lazily (the numpy parts run anywhere).
"""
from __future__ import annotations

import math

import numpy as np

B, S, H, N = 2, 5, 16, 4
YARN = dict(scaling="yarn", factor=4.0, original_max_position=64, beta_fast=4.0, beta_slow=1.0,
            mscale=1.0, mscale_all_dim=0.8, base=10000.0)


def mla_config(q_lora_rank=12, sequence_parallel=False, qkv_bias=False, **rotary):
    from mcore.transformer.config import (AttentionConfig, MLAConfig, ParallelConfig,
                                          RotaryConfig, TransformerConfig)

    rot = dict(YARN, interleaved=True)
    rot.update(rotary)
    return TransformerConfig(
        num_layers=2, hidden_size=H, num_attention_heads=N, ffn_hidden_size=24,
        multi_latent_attention=True,
        mla=MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=10, qk_nope_head_dim=6,
                      qk_rope_head_dim=4, v_head_dim=5),
        rotary=RotaryConfig(**rot), attention=AttentionConfig(qkv_bias=qkv_bias),
        parallel=ParallelConfig(sequence_parallel=sequence_parallel))


def mla_net(cfg, groups=None):
    """A Cell ``x [b, s, h] -> [b, s, h]``: rotary for positions 0..s-1, then one MLA layer
    (``attn``). With sequence parallelism ``x`` is this rank's ``[b, s/tp, h]``."""
    import mindspore as ms
    from mindspore import nn, ops

    from mcore.transformer.layer_specs import mla_attention_spec
    from mcore.transformer.rotary import RotaryEmbedding
    from mcore.transformer.spec import build_module

    split = groups.tp.size if groups is not None and cfg.parallel.sequence_parallel else 1

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.rotary = RotaryEmbedding(cfg.rotary, cfg.rotary_dim)
            self.attn = build_module(mla_attention_spec(cfg), cfg, layer_number=0, groups=groups)

        def construct(self, x):
            s = x.shape[1] * split
            pos = ops.arange(0, s, 1, dtype=ms.int32).reshape(1, s)
            cos, sin = self.rotary(pos)
            return self.attn(x, cos, sin)

    return Net()


def full_weights(net, seed: int = 5) -> dict:
    """``{short name: full float32 array}`` for every parameter of an MLA net built at tp=1
    (random values, norms around 1, so no part is trivial)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in net.parameters_and_names():
        short = name.split("attn.", 1)[1]
        scale = 0.4 if "weight" in short and "norm" not in short else 0.1
        value = rng.standard_normal(p.shape) * scale
        if "norm" in short:
            value = 1.0 + value
        out[short] = value.astype(np.float32)
    return out


def load_full(net, weights: dict, group=None) -> None:
    """Set ``net``'s parameters from full arrays, sharded for ``group`` (None: tp = 1)."""
    import mindspore as ms

    from mcore.tensor_parallel import shard
    from models.weights import split_dims

    dims = split_dims(net)
    for name, p in net.parameters_and_names():
        short = name.split("attn.", 1)[1]
        value = weights[short]
        dim = dims.get(name)
        if group is not None and dim is not None:
            value = shard(value, group.size, group.rank, dim)
        p.set_data(ms.Tensor(value, p.dtype))


# ----- independent numpy reference (float64) ------------------------------------------------

def _mscale(factor, m):
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_frequencies(dim, base, factor, original, beta_fast, beta_slow):
    """YaRN: dims that turn more than ``beta_fast`` times over the original context keep their
    frequency, dims that turn fewer than ``beta_slow`` times are divided by ``factor``, a linear
    ramp in between (dim boundaries rounded outwards)."""
    def dim_of(turns):  # the dim whose wavelength fits ``turns`` times into ``original``
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(dim_of(beta_fast)), 0)
    hi = min(math.ceil(dim_of(beta_slow)), dim - 1)
    hi = hi + 0.001 if hi == lo else hi
    theta = base ** (-np.arange(dim // 2) * 2.0 / dim)
    interp = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0.0, 1.0)  # 1 = fully divided
    return theta * (1 - interp) + theta / factor * interp


def rope_interleaved(x, positions, inv_freq, magnitude):
    """Rotate the pairs ``(x[2i], x[2i+1])`` by ``pos * inv_freq[i]`` and scale by
    ``magnitude`` (complex arithmetic). ``x [..., s, d]``."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * positions[:, None] * inv_freq[None, :]) * magnitude
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def _rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def reference_mla(x, w: dict, cfg) -> np.ndarray:
    """MLA forward of ``x [b, s, h]`` with full weights ``w`` (float64 math)."""
    m, rot = cfg.mla, cfg.rotary
    x = x.astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in w.items()}
    b, s, _ = x.shape
    n, dn, dr, dv, r = (cfg.num_attention_heads, m.qk_nope_head_dim, m.qk_rope_head_dim,
                        m.v_head_dim, m.kv_lora_rank)

    def lin(name, v):
        out = v @ w[f"{name}.weight"].T
        return out + w[f"{name}.bias"] if f"{name}.bias" in w else out

    if m.q_lora_rank is None:
        q = lin("linear_q_proj", x)
    else:
        q = lin("linear_q_up_proj", _rms(lin("linear_q_down_proj", x), w["q_layernorm.weight"],
                                         m.latent_norm_eps))
    q = q.reshape(b, s, n, dn + dr).transpose(0, 2, 1, 3)
    kv = lin("linear_kv_down_proj", x)
    c, k_pe = kv[..., :r], kv[..., r:]
    c = _rms(c, w["kv_layernorm.weight"], m.latent_norm_eps)
    kv_up = lin("linear_kv_up_proj", c).reshape(b, s, n, dn + dv).transpose(0, 2, 1, 3)
    if rot.scaling == "yarn":
        inv = yarn_frequencies(dr, rot.base, rot.factor, rot.original_max_position,
                               rot.beta_fast, rot.beta_slow)
        magnitude = _mscale(rot.factor, rot.mscale) / _mscale(rot.factor, rot.mscale_all_dim)
        scale = (dn + dr) ** -0.5 * _mscale(rot.factor, rot.mscale_all_dim) ** 2
    else:
        inv = rot.base ** (-np.arange(dr // 2) * 2.0 / dr)
        magnitude, scale = 1.0, (dn + dr) ** -0.5
    pos = np.arange(s, dtype=np.float64)
    q_pe = rope_interleaved(q[..., dn:], pos, inv, magnitude)  # [b, n, s, dr]
    k_pe = rope_interleaved(k_pe[:, None], pos, inv, magnitude)  # [b, 1, s, dr]
    scores = np.einsum("bnsd,bntd->bnst", q[..., :dn], kv_up[..., :dn]) + np.einsum(
        "bnsd,bxtd->bnst", q_pe, k_pe)
    scores = scores * scale + np.triu(np.full((s, s), -np.inf), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    o = np.einsum("bnst,bntd->bsnd", p, kv_up[..., dn:]).reshape(b, s, n * dv)
    return lin("linear_proj", o)
