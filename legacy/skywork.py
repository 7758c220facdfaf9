"""Skywork-13B (HF ``model_type`` "skywork", remote code ``SkyworkForCausalLM``): the Llama
layer under Llama's tensor names.

Skywork's checkpoints use Llama's names and math (``model.layers.N.self_attn.q_proj`` ...,
RMSNorm ``rms_norm_eps``, half-split RoPE with ``rope_theta``, SwiGLU, untied ``lm_head``):
MindFormers converts them with transformers' ``LlamaForCausalLM`` and llama.cpp with its Llama
graph. Everything but the ``model_type`` is ``models.llama``'s. Rejected: a ``rope_scaling``
(the remote code's own scaling classes are not mapped).
"""
from __future__ import annotations

from mcore.transformer.config import TransformerConfig
from models import llama

MODEL_TYPES = ("skywork",)
TIE_DEFAULT = False


def config_from_hf(hf: dict) -> TransformerConfig:
    if hf.get("rope_scaling"):
        raise ValueError(f"rope_scaling={hf['rope_scaling']!r}: Skywork's remote scaling is not "
                         "mapped (null: plain RoPE)")
    return llama.config_from_hf(hf)


layer_spec = llama.layer_spec
weight_table = llama.weight_table
