"""The compatibility layer for older model families, built only from ``mcore`` blocks and
``models`` (``GPTModel``, the weight-table machinery). Importing it registers its families with
``models.hf.register_family``; ``models.from_pretrained`` imports it by itself when a
checkpoint's ``model_type`` is not one of ``models/`` (``models`` never imports ``legacy``).

Families (``FAMILIES``: model_type -> module): GPT-2 (``gpt2``), StarCoder / WizardCoder /
SantaCoder (``gpt_bigcode``, multi-query), BLOOM (``bloom``, ALiBi). ``legacy.mindformers``
converts MindFormers legacy ``.ckpt`` + YAML (Llama-style) to a HF directory. See docs/legacy.md.
"""
from legacy import bloom, gpt2, gpt_bigcode
from models.hf import register_family

FAMILIES = {kind: module for module in (gpt2, gpt_bigcode, bloom) for kind in module.MODEL_TYPES}
for _module in (gpt2, gpt_bigcode, bloom):
    register_family(_module)

__all__ = ["FAMILIES", "gpt2", "gpt_bigcode", "bloom"]
