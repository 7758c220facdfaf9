"""The compatibility layer for older model families, built only from ``mcore`` blocks and
``models`` (``GPTModel``, the weight-table machinery). Importing it registers its families with
``models.hf.register_family``; ``models.from_pretrained`` imports it by itself when a
checkpoint's ``model_type`` is not one of ``models/`` (``models`` never imports ``legacy``).

Families (``FAMILIES``: model_type -> module): GPT-2 (``gpt2``), StarCoder / WizardCoder /
SantaCoder (``gpt_bigcode``, multi-query), BLOOM (``bloom``, ALiBi), Qwen2-MoE / Qwen2-57B-A14B
(``qwen2_moe``, gated shared expert), T5 / T5 v1.1 / Flan-T5 (``t5``, encoder-decoder), the
remote-code families Baichuan / Baichuan2 (``baichuan``), InternLM (``internlm``), InternLM2
(``internlm2``), Qwen v1 (``qwen``), ChatGLM2/3 / CodeGeeX2 (``chatglm``) and Skywork
(``skywork``), and the encoder BERT (``bert``, masked LM: ``models.bert.BertModel``).
``legacy.mindformers`` converts MindFormers legacy ``.ckpt`` + YAML (Llama-style) to a HF
directory. See docs/legacy.md.
"""
from legacy import (baichuan, bert, bloom, chatglm, gpt2, gpt_bigcode, internlm, internlm2,
                    qwen2_moe, qwen_v1, skywork, t5)
from models.hf import register_family

_MODULES = (gpt2, gpt_bigcode, bloom, qwen2_moe, baichuan, internlm, internlm2, qwen_v1, chatglm,
            skywork, bert, t5)

FAMILIES = {kind: module for module in _MODULES for kind in module.MODEL_TYPES}
for _module in _MODULES:
    register_family(_module)

__all__ = ["FAMILIES", "gpt2", "gpt_bigcode", "bloom", "qwen2_moe", "baichuan", "internlm",
           "internlm2", "qwen_v1", "chatglm", "bert", "t5"]
