"""ChatGLM2 / ChatGLM3 / CodeGeeX2 (legacy/chatglm.py, remote code, ``model_type`` "chatglm")
against a numpy forward written from the public modeling code: fused ``query_key_value = [q;
k; v]`` with ``multi_query_group_num`` key/value heads, GLM rotary (interleaved pairs over the
first half of each head, base ``10000 * rope_ratio``), ``dense_h_to_4h = [gate; up]`` SwiGLU,
RMSNorm or LayerNorm, ``padded_vocab_size``, the ``rotary_pos_emb.inv_freq`` buffer. Random
tiny checkpoints under ChatGLM's tensor names and config keys; see
tests/legacy/remote_ref.py for the checks (logits 1e-4, greedy, KV cache, save round trip)."""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from legacy import chatglm  # noqa: E402
from tests.legacy import remote_checkpoints as rc  # noqa: E402
from tests.legacy.remote_ref import causal_attention, check_family, rmsnorm, rope  # noqa: E402

V, L, ENC = rc.VOCAB, rc.LAYERS, rc.GLM_ENC
N, G, D = rc.GLM_HEADS, rc.GLM_GROUPS, rc.GLM_HEAD_DIM


def forward(t, ids, layernorm, bias, rope_ratio, eps=1e-5):
    def norm(x, name):
        if not layernorm:
            return rmsnorm(x, t[name + ".weight"], eps)
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

    def linear(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    x = t["transformer.embedding.word_embeddings.weight"][ids]
    b, s = ids.shape
    base = 10000.0 * rope_ratio
    for i in range(L):
        p = f"{ENC}layers.{i}."
        qkv = linear(norm(x, p + "input_layernorm"), p + "self_attention.query_key_value")
        q, k, v = np.split(qkv, [N * D, (N + G) * D], -1)
        q, k, v = q.reshape(b, s, N, D), k.reshape(b, s, G, D), v.reshape(b, s, G, D)
        q = rope(q, D // 2, base, interleaved=True)
        k = rope(k, D // 2, base, interleaved=True)
        x = x + linear(causal_attention(q, k, v), p + "self_attention.dense")
        h4 = linear(norm(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")
        gate, up = np.split(h4, 2, -1)
        x = x + linear(gate / (1 + np.exp(-gate)) * up, p + "mlp.dense_4h_to_h")
    x = norm(x, ENC + "final_layernorm")
    return (x @ t["transformer.output_layer.weight"].T).astype(np.float32)


@pytest.mark.parametrize("layernorm,bias,rope_ratio", [(False, False, 1.0), (True, True, 50.0)])
def test_chatglm_matches_numpy(tmp_path, layernorm, bias, rope_ratio):
    t, config = rc.chatglm(np.random.default_rng(4), layernorm, bias, rope_ratio)
    check_family(tmp_path, config, t, lambda ids: forward(t, ids, layernorm, bias, rope_ratio),
                 vocab=V, buffers=(rc.GLM_INV_FREQ,))


def test_config_errors_name_the_key():
    good = rc.chatglm(np.random.default_rng(0), False, False, 1.0)[1]
    for key, value in (("multi_query_attention", False), ("post_layer_norm", False),
                       ("apply_residual_connection_post_layernorm", True), ("pre_seq_len", 8),
                       ("position_encoding_2d", True)):
        with pytest.raises(ValueError, match=key):
            chatglm.config_from_hf({**good, key: value})
