"""Random tiny checkpoints of the remote-code families that their numpy tests and the tp=2
launch (tests/legacy/test_legacy_tp_parity.py) share: tensors under the family's real names
(float32) and config.json dicts with its real keys. numpy only (no MindSpore import), so a rank
worker can import it after choosing its device."""
from __future__ import annotations

import numpy as np

from tests.legacy.remote_ref import rand

VOCAB, FFN, LAYERS = 128, 96, 2
GLM_HIDDEN, GLM_HEADS, GLM_GROUPS = 64, 4, 2
GLM_HEAD_DIM = GLM_HIDDEN // GLM_HEADS
GLM_ENC = "transformer.encoder."
GLM_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"
HEADS, GROUPS, HIDDEN, QWEN_FFN = 4, 2, 64, 192  # InternLM2 (GQA) and Qwen v1 (MHA)


def baichuan(rng, h: int, n: int, position: str) -> tuple[dict, dict]:
    """Baichuan2 tensors and config (``position``: "rope" / "alibi"; NormHead on)."""
    t = {"model.embed_tokens.weight": rand(rng, VOCAB, h, scale=0.5),
         "model.norm.weight": rand(rng, h, offset=1.0), "lm_head.weight": rand(rng, VOCAB, h)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": rand(rng, h, offset=1.0),
                  p + "post_attention_layernorm.weight": rand(rng, h, offset=1.0),
                  p + "self_attn.W_pack.weight": rand(rng, 3 * h, h),
                  p + "self_attn.o_proj.weight": rand(rng, h, h),
                  p + "mlp.gate_proj.weight": rand(rng, FFN, h),
                  p + "mlp.up_proj.weight": rand(rng, FFN, h),
                  p + "mlp.down_proj.weight": rand(rng, h, FFN)})
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
              "vocab_size": VOCAB, "hidden_size": h, "intermediate_size": FFN,
              "num_hidden_layers": LAYERS, "num_attention_heads": n, "hidden_act": "silu",
              "model_max_length": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
              "position_embedding": position, "norm_head": True}
    return t, config


def chatglm(rng, layernorm: bool, bias: bool, rope_ratio: float) -> tuple[dict, dict]:
    """ChatGLM2/3 tensors (with the ``inv_freq`` buffer) and config: LayerNorm or RMSNorm,
    ``add_bias_linear`` = ``bias``, qkv bias always."""
    h, n, g, d = GLM_HIDDEN, GLM_HEADS, GLM_GROUPS, GLM_HEAD_DIM
    norm = ("weight", "bias") if layernorm else ("weight",)
    t = {"transformer.embedding.word_embeddings.weight": rand(rng, VOCAB, h, scale=0.5),
         "transformer.output_layer.weight": rand(rng, VOCAB, h),
         GLM_INV_FREQ: (1.0 / 10000 ** (np.arange(0, d // 2, 2) / (d // 2))).astype(np.float32)}
    for kind in norm:
        t[GLM_ENC + "final_layernorm." + kind] = rand(rng, h, offset=kind == "weight")
    for i in range(LAYERS):
        p = f"{GLM_ENC}layers.{i}."
        for kind in norm:
            t[p + "input_layernorm." + kind] = rand(rng, h, offset=kind == "weight")
            t[p + "post_attention_layernorm." + kind] = rand(rng, h, offset=kind == "weight")
        t.update({p + "self_attention.query_key_value.weight": rand(rng, (n + 2 * g) * d, h),
                  p + "self_attention.query_key_value.bias": rand(rng, (n + 2 * g) * d),
                  p + "self_attention.dense.weight": rand(rng, h, n * d),
                  p + "mlp.dense_h_to_4h.weight": rand(rng, 2 * FFN, h),
                  p + "mlp.dense_4h_to_h.weight": rand(rng, h, FFN)})
        if bias:
            t.update({p + "self_attention.dense.bias": rand(rng, h),
                      p + "mlp.dense_h_to_4h.bias": rand(rng, 2 * FFN),
                      p + "mlp.dense_4h_to_h.bias": rand(rng, h)})
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
              "padded_vocab_size": VOCAB, "hidden_size": h, "ffn_hidden_size": FFN,
              "num_layers": LAYERS, "num_attention_heads": n, "kv_channels": d,
              "multi_query_attention": True, "multi_query_group_num": g,
              "rmsnorm": not layernorm, "layernorm_epsilon": 1e-5, "add_bias_linear": bias,
              "add_qkv_bias": True, "post_layer_norm": True, "rope_ratio": rope_ratio,
              "apply_residual_connection_post_layernorm": False, "seq_length": 64,
              "original_rope": True, "tie_word_embeddings": False, "pad_token_id": 0,
              "eos_token_id": 2}
    return t, config


def internlm2_tensors(rng, bias: bool) -> dict:
    """InternLM2 tensors: ``wqkv`` rows grouped by kv head ``[g, qg + 2, d]``; ``bias``: wqkv
    and wo biases."""
    h, n, g, d = HIDDEN, HEADS, GROUPS, HIDDEN // HEADS
    t = {"model.tok_embeddings.weight": rand(rng, VOCAB, h, scale=0.5),
         "model.norm.weight": rand(rng, h, offset=1.0), "output.weight": rand(rng, VOCAB, h)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({p + "attention_norm.weight": rand(rng, h, offset=1.0),
                  p + "ffn_norm.weight": rand(rng, h, offset=1.0),
                  p + "attention.wqkv.weight": rand(rng, (n + 2 * g) * d, h),
                  p + "attention.wo.weight": rand(rng, h, h),
                  p + "feed_forward.w1.weight": rand(rng, FFN, h),
                  p + "feed_forward.w3.weight": rand(rng, FFN, h),
                  p + "feed_forward.w2.weight": rand(rng, h, FFN)})
        if bias:
            t[p + "attention.wqkv.bias"] = rand(rng, (n + 2 * g) * d)
            t[p + "attention.wo.bias"] = rand(rng, h)
    return t


def internlm2_config(bias: bool, scaling: dict | None) -> dict:
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": GROUPS, "hidden_act": "silu", "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 50000.0, "rope_scaling": scaling, "bias": bias,
            "tie_word_embeddings": False, "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2}


def qwen_v1_tensors(rng, bias: bool) -> dict:
    """Qwen v1 tensors: ``c_attn = [q; k; v]`` with bias; ``bias``: the other biases too."""
    h, f = HIDDEN, QWEN_FFN // 2
    t = {"transformer.wte.weight": rand(rng, VOCAB, h, scale=0.5),
         "transformer.ln_f.weight": rand(rng, h, offset=1.0),
         "lm_head.weight": rand(rng, VOCAB, h)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        t.update({p + "ln_1.weight": rand(rng, h, offset=1.0),
                  p + "ln_2.weight": rand(rng, h, offset=1.0),
                  p + "attn.c_attn.weight": rand(rng, 3 * h, h),
                  p + "attn.c_attn.bias": rand(rng, 3 * h),
                  p + "attn.c_proj.weight": rand(rng, h, h),
                  p + "mlp.w1.weight": rand(rng, f, h),
                  p + "mlp.w2.weight": rand(rng, f, h),
                  p + "mlp.c_proj.weight": rand(rng, h, f)})
        if bias:
            for name, rows in (("attn.c_proj", h), ("mlp.w1", f), ("mlp.w2", f),
                               ("mlp.c_proj", h)):
                t[p + name + ".bias"] = rand(rng, rows)
    return t


def qwen_v1_config(bias: bool, pct: float) -> dict:
    return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": QWEN_FFN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "kv_channels": HIDDEN // HEADS, "rotary_pct": pct,
            "rotary_emb_base": 20000.0, "layer_norm_epsilon": 1e-6, "seq_length": 64,
            "max_position_embeddings": 64, "no_bias": not bias, "use_dynamic_ntk": True,
            "use_logn_attn": True, "tie_word_embeddings": False}
