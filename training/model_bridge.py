"""``model`` section -> a Hugging Face style ``config.json`` dict for ``models.build_from_config``.

The family files in ``models/`` build a model from a HF config (they know each family's
architecture: Qwen2.5's qkv bias, Qwen3's qk-norm, GLM-4's partial rotary and sandwich norms,
TeleChat2's key names). This module writes that dict from our small ``ModelConfig``, so a run can
train any dense family from scratch with the sizes of its YAML file:

    model = models.build_from_config(hf_config(cfg.model), tp_group=dims.tp)

With ``model.hf_path`` set, the loop loads ``models.from_pretrained(hf_path)`` instead.
"""
from __future__ import annotations

# model.family -> HF model_type
MODEL_TYPES = {"llama": "llama", "llama3_1": "llama", "qwen2_5": "qwen2", "qwen3": "qwen3",
               "glm4": "glm4", "telechat2": "telechat"}

# Llama 3.1's rotary frequency bands (as in its published config.json).
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config(model) -> dict:
    """HF ``config.json`` contents for a ``ModelConfig`` (SwiGLU, RMSNorm, rotary)."""
    family = model.family
    if family not in MODEL_TYPES:
        raise ValueError(f"model.family={family!r} has no Hugging Face mapping "
                         f"(known: {sorted(MODEL_TYPES)})")
    common = {"model_type": MODEL_TYPES[family], "vocab_size": model.vocab_size,
              "hidden_size": model.hidden_size, "num_key_value_heads": model.num_kv_heads,
              "max_position_embeddings": model.max_position_embeddings, "rope_theta": model.rope_theta,
              "tie_word_embeddings": model.tie_word_embeddings, "hidden_act": "silu"}
    if family == "telechat2":  # TeleChat's own key names
        return {**common, "n_layer": model.num_layers, "n_head": model.num_heads,
                "ffn_hidden_size": model.ffn_hidden_size, "layer_norm_epsilon": model.norm_eps}
    out = {**common, "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
           "intermediate_size": model.ffn_hidden_size, "rms_norm_eps": model.norm_eps}
    if family == "llama3_1":
        out["rope_scaling"] = dict(LLAMA3_ROPE_SCALING)
    if family == "glm4":
        out["partial_rotary_factor"] = 0.5
        out["attention_bias"] = True
    return out
