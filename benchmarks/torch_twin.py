"""The PyTorch twin of the benchmark model: the reference that benchmarks/bench_train_step.py
measures beside the msformers training step, in its own process.

    python benchmarks/torch_twin.py DIR

``DIR`` (written by ``benchmarks/train_step_worker.py``'s ``export`` command): the initial
weights as a Hugging Face Llama directory (``config.json`` + ``model.safetensors``, from
``models.save_pretrained``), ``batch.npz`` (``inputs``, ``labels``: int32 ``[b, s]``) and
``bench.json`` (``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``clip_grad``,
``threads``). The twin builds the same Llama (RMSNorm, rotary in the Hugging Face half-split
layout, grouped-query attention through ``scaled_dot_product_attention``, SwiGLU, untied head),
loads the weights, and runs the step people would write in PyTorch eager: forward, mean token
cross-entropy, backward, ``clip_grad_norm_``, ``torch.optim.AdamW`` (decay on matrices only,
as ``training.optim.should_decay``), fp32.

Commands on stdin, one per line, as ``train_step_worker.py``: ``step`` -> ``done <loss>``;
``stats`` -> ``rss <peak RSS in bytes>``; ``quit``. Prints ``ready <tokens per step>`` first.
Needs only torch, numpy and safetensors (``pip install -e ".[bench-torch]"``); no MindSpore.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(seq: int, head_dim: int, theta: float):
    """cos, sin ``[s, d]`` of the half-split (Hugging Face) rotary layout."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)  # [s, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [s, d]
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, h: int, n_heads: int, n_kv: int):
        super().__init__()
        self.n, self.kv, self.d = n_heads, n_kv, h // n_heads
        self.q_proj = nn.Linear(h, n_heads * self.d, bias=False)
        self.k_proj = nn.Linear(h, n_kv * self.d, bias=False)
        self.v_proj = nn.Linear(h, n_kv * self.d, bias=False)
        self.o_proj = nn.Linear(n_heads * self.d, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n, self.d).transpose(1, 2)  # [b, s, h] -> [b, n, s, d]
        k = self.k_proj(x).view(b, s, self.kv, self.d).transpose(1, 2)  # -> [b, kv, s, d]
        v = self.v_proj(x).view(b, s, self.kv, self.d).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n * self.d))  # -> [b, s, h]


class MLP(nn.Module):
    def __init__(self, h: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h, eps = c["hidden_size"], c["rms_norm_eps"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.self_attn = Attention(h, c["num_attention_heads"], c["num_key_value_heads"])
        self.mlp = MLP(h, c["intermediate_size"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class Llama(nn.Module):
    """``forward(inputs [b, s], labels [b, s]) -> mean token cross-entropy``; parameter names
    are the Hugging Face ones, so ``load_state_dict`` takes a ``save_pretrained`` file."""

    def __init__(self, c: dict):
        super().__init__()
        if c.get("tie_word_embeddings"):
            raise ValueError("torch_twin: tie_word_embeddings is not supported")
        self.model = Body(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        d = c["hidden_size"] // c["num_attention_heads"]
        self.cos, self.sin = rotary_tables(c["max_position_embeddings"], d, c["rope_theta"])

    def forward(self, inputs, labels):
        s = inputs.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.model.embed_tokens(inputs)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))  # [b, s, V]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())  # [b*s, V] -> []


def load(directory: Path) -> Llama:
    from safetensors.torch import load_file

    model = Llama(json.loads((directory / "config.json").read_text()))
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=True)
    return model


def main(directory: str) -> None:
    root = Path(directory)
    cfg = json.loads((root / "bench.json").read_text())
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    model = load(root)
    batch = np.load(root / "batch.npz")
    inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
    labels = torch.from_numpy(batch["labels"].astype(np.int64))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"],
                            betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"])
    print(f"ready {inputs.numel()}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            loss = model(inputs, labels)
            loss.backward()
            if cfg["clip_grad"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            print(f"done {loss.item()}", flush=True)
        elif cmd == "stats":
            print(f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)
        elif cmd == "quit":
            return
        else:
            raise ValueError(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1])
