"""Shared parts of the remote-code family tests (Baichuan, InternLM2, Qwen v1, ChatGLM): numpy
building blocks written from the public math, a random checkpoint writer and one check that
loads the checkpoint through ``models.from_pretrained`` and compares it with the family's numpy
forward.

``check_family(tmp_path, config, tensors, forward)``: ``config`` is the family's config.json
(its own key names), ``tensors`` its weights under their real names (float32), ``forward(ids
[b, s]) -> logits [b, s, V]`` the numpy reference. Checked: logits within 1e-4; greedy tokens
(``models.generate``, KV cache) equal to numpy's greedy by full recompute; the last token
decoded from the KV cache of the others equal to the full forward; ``save_pretrained`` writes
back exactly the original tensors under the original names.
"""
from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np

import models
from models.safetensors_io import read_checkpoint, write_checkpoint

ATOL = 1e-4


def rand(rng, *shape, scale=0.1, offset=0.0) -> np.ndarray:
    return (offset + scale * rng.standard_normal(shape)).astype(np.float32)


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, w_gate, w_up, w_down):
    """``down(silu(x gate^T) * x up^T)``, weights ``[out, in]``."""
    return (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def rope_angles(positions, rot_dim, base):
    """``[s, rot_dim / 2]`` angles ``pos * base ** (-2i / rot_dim)``."""
    inv = base ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)
    return np.outer(positions, inv)


def rope(x, rot_dim, base, interleaved=False, factor=1.0):
    """Rotate the first ``rot_dim`` dims of ``x [b, s, n, d]`` by position (0..s-1, divided by
    ``factor``: linear scaling): pairs ``(i, i + rot_dim/2)`` (half-split) or ``(2i, 2i + 1)``
    (interleaved); the rest passes."""
    s = x.shape[1]
    ang = rope_angles(np.arange(s) / factor, rot_dim, base)  # [s, r/2]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]  # [1, s, 1, r/2]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(rot.shape)
    else:
        a, b = rot[..., :rot_dim // 2], rot[..., rot_dim // 2:]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
    return np.concatenate([out, rest], -1).astype(np.float32)


def causal_attention(q, k, v, bias=None):
    """``q [b, s, n, d]``, ``k / v [b, s, g, d]`` (g divides n; query head ``j`` reads kv head
    ``j // (n / g)``) -> ``[b, s, n d]``; ``bias [n, s, s]`` added to the scaled scores."""
    b, s, n, d = q.shape
    rep = n // k.shape[2]
    k, v = np.repeat(k, rep, 2), np.repeat(v, rep, 2)
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(d)
    if bias is not None:
        scores = scores + bias[None]
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknd->bqnd", p, v).reshape(b, s, n * d)


def write(tmp_path: Path, config: dict, tensors: dict) -> Path:
    path = Path(tmp_path) / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config, indent=1))
    write_checkpoint(path, {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()})
    return path


def numpy_greedy(forward, ids: np.ndarray, steps: int) -> np.ndarray:
    seq = ids
    for _ in range(steps):
        nxt = forward(seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], 1)
    return seq[:, ids.shape[1]:]


def check_family(tmp_path, config: dict, tensors: dict, forward, seed: int = 0, steps: int = 4,
                 vocab: int | None = None, buffers: tuple = ()):
    """See the module docstring; returns the loaded model. ``vocab``: token ids are drawn
    below it (default ``config["vocab_size"]``); ``buffers``: checkpoint tensors that are not
    weights (loaded past, not saved back)."""
    path = write(tmp_path, config, tensors)
    model = models.from_pretrained(path)
    vocab = vocab or config["vocab_size"]
    ids = np.random.default_rng(seed).integers(3, vocab, (2, 8)).astype(np.int32)
    ref = forward(ids)
    got = model(ms.Tensor(ids)).asnumpy()
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= ATOL, f"max |logits - numpy| = {err}"
    greedy = np.array(models.generate(model, ids, max_new_tokens=steps))
    np.testing.assert_array_equal(greedy, numpy_greedy(forward, ids, steps))
    cache = model.new_cache()  # prefill s - 1 tokens, then decode the last one from the cache
    parts = [model(ms.Tensor(ids[:, :-1]), cache=cache).asnumpy(),
             model(ms.Tensor(ids[:, -1:]), cache=cache).asnumpy()]
    np.testing.assert_allclose(np.concatenate(parts, 1), got, rtol=0, atol=2e-5)
    out = Path(tmp_path) / "saved"
    model.save_pretrained(out)
    saved = read_checkpoint(out)
    assert set(saved) == set(tensors) - set(buffers)
    for name, lazy in saved.items():
        np.testing.assert_array_equal(lazy.load(), tensors[name], err_msg=name)
    return model


class InMemoryTensor:
    """An array with the ``shape`` / ``load()`` interface of ``models.safetensors_io.LazyTensor``,
    for calling the weight-table functions (``models.weights.to_local``) without a file."""

    def __init__(self, value: np.ndarray):
        self.value, self.shape = value, value.shape

    def load(self) -> np.ndarray:
        return self.value
