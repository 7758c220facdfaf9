"""A tiny MoE GPTModel (layer 0 dense, layers 1-2 MoE) and its loss/gradients, shared by the
single-process and the 2-rank tests of ``models/test_gpt_moe*.py``."""
from __future__ import annotations

import numpy as np

VOCAB, E = 32, 4


def moe_config(**moe_changes):
    from mcore.moe.config import MoEConfig
    from mcore.transformer.config import TransformerConfig

    moe = dict(num_experts=E, top_k=2, ffn_hidden_size=12, first_k_dense=1, aux_loss_coeff=0.1,
               z_loss_coeff=1e-3)
    return TransformerConfig(num_layers=3, hidden_size=16, num_attention_heads=4,
                             num_query_groups=2, ffn_hidden_size=24,
                             moe=MoEConfig(**{**moe, **moe_changes}))


def moe_model(cfg, groups=None, dispatcher="AllToAllDispatcher"):
    from mcore.transformer.layer_specs import gpt_layer_specs, moe_mlp_spec
    from models import GPTModel

    specs = gpt_layer_specs(cfg, moe_mlp_spec(dispatcher=dispatcher))
    return GPTModel(cfg, specs, VOCAB, groups=groups)


def batch(seed: int, b: int = 2, s: int = 5):
    """``(input_ids, labels)`` int32 ``[b, s]`` numpy arrays drawn from ``seed``."""
    r = np.random.default_rng(seed)
    return (r.integers(0, VOCAB, (b, s)).astype(np.int32),
            r.integers(0, VOCAB, (b, s)).astype(np.int32))


def loss_and_grads(model, ids, labels, jit: bool = False):
    """``(loss, lm_loss, aux [L, 3], counts [L, E], {name: grad})`` of ``model.loss_with_aux``
    (numpy), eager or compiled with ``mindspore.jit``."""
    import mindspore as ms

    names = {id(p): n for n, p in model.parameters_and_names()}
    params = model.trainable_params()

    def objective(x, y):
        loss, lm_loss, aux, counts = model.loss_with_aux(x, y)
        return loss, lm_loss, aux, counts

    fn = ms.value_and_grad(objective, grad_position=None, weights=params, has_aux=True)
    if jit:
        fn = ms.jit(fn)
    (loss, lm_loss, aux, counts), grads = fn(ms.Tensor(ids), ms.Tensor(labels))
    return (float(loss.asnumpy()), float(lm_loss.asnumpy()), aux.asnumpy(), counts.asnumpy(),
            {names[id(p)]: g.asnumpy() for p, g in zip(params, grads)})
