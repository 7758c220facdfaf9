"""GPTModel single-process: loss head, recompute, errors, sequence parallelism on one rank."""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mcore.transformer.config import (ParallelConfig, PrecisionConfig,  # noqa: E402
                                      TransformerConfig)
from mcore.transformer.layer_specs import gpt_layer_spec  # noqa: E402
from models import GPTModel  # noqa: E402

VOCAB = 64


def small(**changes) -> TransformerConfig:
    return TransformerConfig(**{**dict(num_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_query_groups=2, ffn_hidden_size=48), **changes})


def make(cfg, tie=False):
    return GPTModel(cfg, gpt_layer_spec(cfg), VOCAB, tie_embeddings=tie)


def ids_labels():
    r = np.random.default_rng(0)
    return (ms.Tensor(r.integers(0, VOCAB, (2, 6)).astype(np.int32)),
            ms.Tensor(r.integers(0, VOCAB, (2, 6)).astype(np.int32)))


@pytest.mark.parametrize("tie", [False, True])
def test_loss_is_cross_entropy_of_logits(tie):
    model = make(small(), tie)
    assert model.cross_entropy.fused is not None  # the CPU cross-entropy kernel, on by default
    ids, labels = ids_labels()
    z = model(ids).asnumpy().astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, labels.asnumpy()[..., None], -1)[..., 0]
    np.testing.assert_allclose(model(ids, labels=labels).asnumpy(), ref, atol=1e-5)


def test_recompute_keeps_gradients():
    ids, labels = ids_labels()
    grads = []
    for recompute in ((), "all"):
        model = make(small(precision=PrecisionConfig(recompute_layers=recompute)))
        params = model.trainable_params()

        def loss_fn(x, y, model=model):
            return model(x, labels=y).mean()

        grads.append([g.asnumpy() for g in ms.grad(loss_fn, None, params)(ids, labels)])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="vocab_size=63"):
        from mcore.parallel_state import ProcessGroup

        GPTModel(small(), gpt_layer_spec(small()), 63,
                 tp_group=ProcessGroup("tp", (0, 1), 0, "fake"))
    from mcore.moe.config import MoEConfig

    with pytest.raises(NotImplementedError, match="sequence_parallel=True with MoE layers"):
        make(small(parallel=ParallelConfig(sequence_parallel=True),
                   moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=16)))


def test_sequence_parallel_on_one_rank_is_the_plain_model():
    """On a tp group of size one every sequence-parallel mapping is the identity (the model
    ``training/generate.py`` joins from a checkpoint written with sp): same parameters, logits
    and KV-cache decoding; only the norm weights carry the ``sequence_parallel`` flag."""
    import models

    plain, sp = make(small()), make(small(parallel=ParallelConfig(sequence_parallel=True)))
    ids, _ = ids_labels()
    flagged = sorted(n for n, p in sp.parameters_and_names() if getattr(p, "sequence_parallel", False))
    assert flagged == ["decoder.final_norm.weight"] + [
        f"decoder.layers.{i}.{norm}.weight" for i in range(2) for norm in ("input_norm", "pre_mlp_norm")]
    assert not any(getattr(p, "sequence_parallel", False) for p in plain.get_parameters())
    np.testing.assert_array_equal(sp(ids).asnumpy(), plain(ids).asnumpy())
    assert models.generate(sp, ids.asnumpy(), max_new_tokens=3) == \
        models.generate(plain, ids.asnumpy(), max_new_tokens=3)
