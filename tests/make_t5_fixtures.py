"""T5 fixtures for ``tests/make_hf_fixtures.py`` (``--only t5 t5_v1_1``; torch + transformers).

``t5``: original T5 (ReLU MLP, tied head with the ``d_model ** -0.5`` output scale), config as
transformers 5 writes it. ``t5_v1_1``: gated-GELU MLP, 3 decoder layers over 2 encoder layers,
a separate ``lm_head`` and a Hub-style config (``tie_word_embeddings: false``). Both: d_model
64, 4 heads of 16, d_ff 128, vocab 256, few buckets with a short ``max_distance`` so the
12-token encoder input reaches the logarithmic buckets; relative biases N(0, 1).
``reference.npz``: ``input_ids [2, 12]`` with ``attention_mask`` (row 1 ends in 4 padding
tokens), ``decoder_input_ids [2, 8]``, ``logits [2, 8, 256]``, ``labels`` (-100 on the last 2
tokens of row 0) and transformers' ``loss``, and ``greedy [2, 8]`` (``generate``, no eos stop).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

_SIZES = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
T5_FAMILIES = {
    "t5": dict(_SIZES, feed_forward_proj="relu", relative_attention_num_buckets=8,
               relative_attention_max_distance=16),
    "t5_v1_1": dict(_SIZES, feed_forward_proj="gated-gelu", num_decoder_layers=3,
                    relative_attention_num_buckets=16, relative_attention_max_distance=20),
}


def _randomise(model, gen) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("relative_attention_bias.weight"):
                p.copy_(noise)
            else:
                p.copy_(0.1 * noise)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))  # bf16 on disk


def make_t5(family: str, out: Path, seed: int) -> dict:
    kwargs = T5_FAMILIES[family]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs)).eval()
    _randomise(model, gen)
    target = out / family
    shutil.rmtree(target, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(target)
    if family == "t5_v1_1":  # a separate head, as the Hub's v1.1 checkpoints hold it
        tensors = load_file(str(target / "model.safetensors"))
        head = 0.1 * torch.randn(tensors["shared.weight"].shape, generator=gen)
        tensors["lm_head.weight"] = head.to(torch.bfloat16)
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((target / "config.json").read_text())
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs", None)
        (target / "config.json").write_text(json.dumps(config, indent=2))
    ref = transformers.T5ForConditionalGeneration.from_pretrained(target, dtype=torch.float32)
    ref = ref.eval()
    if family == "t5_v1_1":
        assert not torch.equal(ref.lm_head.weight, ref.shared.weight), "head got tied"
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 256, size=(2, 12)).astype(np.int64)
    mask = np.ones((2, 12), np.int64)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    dec = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(2, 256, size=(2, 7))], 1)
    labels = np.concatenate([dec[:, 1:], rng.integers(2, 256, size=(2, 1))], 1)
    labels[0, 6:] = -100
    t = torch.from_numpy
    with torch.no_grad():
        outputs = ref(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                      labels=t(labels))
        gen_ids = ref.generate(input_ids=t(ids), attention_mask=t(mask), max_new_tokens=8,
                               do_sample=False, eos_token_id=None, num_beams=1,
                               use_cache=False)  # its cache breaks with 3 decoder layers over 2
        greedy = gen_ids[:, 1:].numpy()
        full = ref(input_ids=t(ids), attention_mask=t(mask),
                   decoder_input_ids=gen_ids[:, :-1]).logits.float().numpy()
        top2 = np.sort(full, -1)[..., -2:]
        gap = float((top2[..., 1] - top2[..., 0]).min())
    np.savez(target / "reference.npz", input_ids=ids.astype(np.int32),
             attention_mask=mask.astype(np.int32), decoder_input_ids=dec.astype(np.int32),
             labels=labels.astype(np.int32), logits=outputs.logits.float().numpy(),
             loss=np.float32(outputs.loss), greedy=greedy.astype(np.int32))
    return {"family": family, "min_top2_gap": gap, "min_router_gap": None,
            "bytes": sum(f.stat().st_size for f in target.iterdir())}
