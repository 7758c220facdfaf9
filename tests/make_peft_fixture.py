"""Write a tiny PEFT LoRA adapter for the Llama fixture, made by PEFT itself, and its logits.

Run once by a developer (NOT by CI; needs torch + transformers + peft):

    /path/to/venv-with-peft/bin/python tests/make_peft_fixture.py [--out tests/fixtures/peft/llama_lora]

It loads ``tests/fixtures/hf/llama`` in float32, wraps it with ``peft.get_peft_model`` (r 4,
alpha 8, every attention and MLP projection, ``init_lora_weights=False`` so that B is not zero),
saves the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and records
``reference.npz``: ``input_ids`` (the fixture's) and ``logits`` of the adapted model (float32).
``tests/models/test_lora.py`` checks that ``models.peft.load_adapter`` reproduces them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
BASE = ROOT / "fixtures" / "hf" / "llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "fixtures" / "peft" / "llama_lora"))
    out = Path(ap.parse_args().out)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.eval()
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card
    saved = json.loads((out / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = "tests/fixtures/hf/llama"  # not this machine's path
    (out / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    ids = np.load(BASE / "reference.npz")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor(ids).long()).logits.numpy().astype(np.float32)
    np.savez(out / "reference.npz", input_ids=ids, logits=logits)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
