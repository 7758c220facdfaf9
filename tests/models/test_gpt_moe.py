"""GPTModel with MoE layers in one process: which layers are MoE, parameter names, the aux-loss
channel (loss = LM loss + summed, coefficient-weighted router losses), PyNative = jit forward and
backward, spec/config mismatches, and ``precision.params_dtype``."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mcore.moe.config import MoEConfig  # noqa: E402
from mcore.parallel_state import ModelGroups, ProcessGroup  # noqa: E402
from mcore.transformer.config import PrecisionConfig, TransformerConfig  # noqa: E402
from mcore.transformer.layer_specs import gpt_layer_spec, gpt_layer_specs  # noqa: E402
from models import GPTModel  # noqa: E402
from tests.models.moe_helpers import E, VOCAB, batch, loss_and_grads, moe_config, moe_model  # noqa: E402,E501


def test_which_layers_are_moe():
    assert [MoEConfig(num_experts=2, top_k=1).is_moe_layer(i) for i in range(3)] == [True] * 3
    freq = MoEConfig(num_experts=2, top_k=1, first_k_dense=1, layer_freq=2)
    assert [freq.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]
    listed = MoEConfig(num_experts=2, top_k=1, moe_layers=[3, 0])
    assert listed.moe_layers == (0, 3)
    assert [listed.is_moe_layer(i) for i in range(4)] == [True, False, False, True]
    assert not any(MoEConfig().is_moe_layer(i) for i in range(3))  # default: dense


@pytest.mark.parametrize("moe, field", [
    (dict(moe_layers=(1, 5)), "moe.moe_layers"),
    (dict(moe_layers=(1,), first_k_dense=1), "moe.moe_layers"),
    (dict(first_k_dense=3), "moe.first_k_dense"),
    (dict(layer_freq=0), "moe.layer_freq"),
    (dict(ffn_hidden_size=0), "moe.ffn_hidden_size"),
])
def test_moe_layer_choice_errors_name_the_field(moe, field):
    with pytest.raises(ValueError, match=field):
        moe_config(**moe)


def test_moe_model_structure_and_names():
    model = moe_model(moe_config())
    assert model.moe_layers == (1, 2)
    params = dict(model.parameters_and_names())
    assert "decoder.layers.0.mlp.linear_fc1.weight" in params
    for i in (1, 2):
        assert params[f"decoder.layers.{i}.mlp.experts.fc1"].shape == (E, 16, 24)
        assert params[f"decoder.layers.{i}.mlp.experts.fc2"].shape == (E, 12, 16)
        assert params[f"decoder.layers.{i}.mlp.router.weight"].shape == (E, 16)
        assert f"decoder.layers.{i}.mlp.linear_fc1.weight" not in params
    experts = {n for n, p in params.items() if getattr(p, "expert", False)}
    assert experts == {f"decoder.layers.{i}.mlp.experts.fc{j}" for i in (1, 2) for j in (1, 2)}


def test_spec_that_disagrees_with_config_moe_names_the_layer():
    cfg = moe_config()
    with pytest.raises(ValueError, match="layer 1 must have a MoE mlp"):
        GPTModel(cfg, gpt_layer_spec(cfg), VOCAB)
    with pytest.raises(ValueError, match="layer 1 must not have a MoE mlp"):
        GPTModel(moe_config(first_k_dense=2), gpt_layer_specs(cfg), VOCAB)
    with pytest.raises(ValueError, match="moe.num_experts=0: must be > 0 for MoELayer"):
        GPTModel(dataclasses.replace(cfg, moe=MoEConfig()), gpt_layer_specs(cfg), VOCAB)


def test_loss_is_lm_loss_plus_coefficient_weighted_aux():
    ids, labels = batch(0)
    model = moe_model(moe_config())
    loss, lm_loss, aux, counts = (t.asnumpy() for t in model.loss_with_aux(
        ms.Tensor(ids), ms.Tensor(labels)))
    lm_ref = model(ms.Tensor(ids), labels=ms.Tensor(labels)).asnumpy().mean()
    np.testing.assert_allclose(lm_loss, lm_ref, rtol=1e-6)
    np.testing.assert_allclose(loss, lm_loss + aux.sum(), rtol=1e-6)
    assert aux.shape == (2, 3) and counts.shape == (2, E)
    assert aux[:, 0].min() > 0 and aux[:, 2].min() > 0 and aux[:, 1].max() == 0
    np.testing.assert_array_equal(counts.sum(1), [2 * 5 * 2] * 2)  # b * s * top_k per layer
    # same weights (seeded by name), twice the coefficient: twice the load-balancing term
    double = moe_model(moe_config(aux_loss_coeff=0.2))
    _, lm2, aux2, _ = (t.asnumpy() for t in double.loss_with_aux(ms.Tensor(ids),
                                                                  ms.Tensor(labels)))
    np.testing.assert_allclose(lm2, lm_loss, rtol=1e-6)
    np.testing.assert_allclose(aux2[:, 0], 2 * aux[:, 0], rtol=1e-5)
    np.testing.assert_allclose(aux2[:, 2], aux[:, 2], rtol=1e-5)


def test_dispatchers_agree_and_jit_equals_pynative_forward_and_backward():
    """All-to-all (PyNative only: data-dependent shapes) == all-gather == all-gather under jit."""
    ids, labels = batch(1)
    eager = loss_and_grads(moe_model(moe_config(), dispatcher="AllToAllDispatcher"), ids, labels)
    gather = moe_model(moe_config(), dispatcher="AllGatherDispatcher")
    for other in (loss_and_grads(gather, ids, labels), loss_and_grads(gather, ids, labels, True)):
        for a, b in zip(eager[:4], other[:4]):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        assert eager[4].keys() == other[4].keys()
        for name, grad in eager[4].items():
            np.testing.assert_allclose(other[4][name], grad, rtol=1e-4, atol=1e-6, err_msg=name)
    for i in (1, 2):  # every routed expert weight and the router learn
        assert np.abs(eager[4][f"decoder.layers.{i}.mlp.experts.fc1"]).max() > 0
        assert np.abs(eager[4][f"decoder.layers.{i}.mlp.router.weight"]).max() > 0


def test_aux_loss_reaches_the_router_gradient():
    ids, labels = batch(2)
    with_aux = loss_and_grads(moe_model(moe_config()), ids, labels)[4]
    without = loss_and_grads(moe_model(moe_config(aux_loss_coeff=0.0, z_loss_coeff=0.0)),
                             ids, labels)[4]
    name = "decoder.layers.1.mlp.router.weight"
    assert np.abs(with_aux[name] - without[name]).max() > 1e-6
    np.testing.assert_allclose(with_aux["output_layer.weight"], without["output_layer.weight"],
                               rtol=1e-5, atol=1e-7)


def test_generation_path_drops_aux_and_dense_model_returns_a_zero_row():
    ids, labels = batch(3)
    model = moe_model(moe_config())
    logits, aux, _ = model.forward_with_aux(ms.Tensor(ids))
    np.testing.assert_allclose(logits.asnumpy(), model(ms.Tensor(ids)).asnumpy(), rtol=1e-6)
    assert logits.shape == (2, 5, VOCAB) and aux.shape == (2, 3)
    dense_cfg = dataclasses.replace(moe_config(), moe=MoEConfig())
    dense = GPTModel(dense_cfg, gpt_layer_specs(dense_cfg), VOCAB)
    assert dense.moe_layers == ()
    loss, lm_loss, aux, counts = (t.asnumpy() for t in dense.loss_with_aux(
        ms.Tensor(ids), ms.Tensor(labels)))
    assert aux.shape == (1, 3) and counts.shape == (1, 1) and not aux.any() and not counts.any()
    assert loss == lm_loss


def test_dropless_moe_model_decodes_compiled_with_the_eager_tokens():
    """One process: every MoE layer takes the all-gather dispatcher (static shapes), so
    ``models.generate`` decodes compiled by default, with the tokens of PyNative decoding."""
    import models
    from models.compiled_decode import compiles, decode_stats

    model = moe_model(moe_config())  # dropless; asks for all-to-all, gets all-gather at ep=1
    assert model.config.moe.capacity_factor is None and compiles(model)
    prompts = [[3, 7, 1, 9, 30], [5, 2]]
    eager = models.generate(model, prompts, 10, compiled=False)
    assert all(len(set(row)) > 1 for row in eager)  # not a degenerate model
    assert models.generate(model, prompts, 10) == eager
    assert decode_stats(model)["graphs"] >= 2  # a prefill and the 1-token step were compiled


def test_groups_object_and_tp_group_compatibility():
    cfg = moe_config()
    model = moe_model(cfg, groups=ModelGroups.single())
    assert model.groups == ModelGroups() and model.tp_group.size == 1
    tp = ProcessGroup.single("tp")
    dense_cfg = dataclasses.replace(cfg, moe=MoEConfig())
    assert GPTModel(dense_cfg, gpt_layer_spec(dense_cfg), VOCAB, tp_group=tp).groups.tp is tp
    with pytest.raises(ValueError, match="GPTModel: pass groups= or tp_group="):
        GPTModel(dense_cfg, gpt_layer_spec(dense_cfg), VOCAB, groups=ModelGroups(), tp_group=tp)
    cp2 = ProcessGroup("cp", (0, 1), 0, "fake")
    with pytest.raises(NotImplementedError, match="cp size 2"):
        moe_model(cfg, groups=ModelGroups(cp=cp2))


@pytest.mark.parametrize("moe", [False, True])
def test_params_dtype_float16_creates_float16_parameters(moe):
    cfg = moe_config() if moe else dataclasses.replace(moe_config(), moe=MoEConfig())
    cfg = dataclasses.replace(cfg, precision=PrecisionConfig(params_dtype="float16"))
    model = GPTModel(cfg, gpt_layer_specs(cfg), VOCAB, tie_embeddings=False)
    dtypes = {n: p.dtype for n, p in model.parameters_and_names()}
    routers = {n for n in dtypes if n.endswith(("router.weight", "router.expert_bias"))}
    assert {dtypes[n] for n in routers} <= {ms.float32}
    assert {d for n, d in dtypes.items() if n not in routers} == {ms.float16}
    assert bool(routers) == moe
    default = GPTModel(dataclasses.replace(cfg, precision=PrecisionConfig()), gpt_layer_specs(cfg),
                       VOCAB)
    assert {p.dtype for p in default.get_parameters()} == {ms.float32}


def test_transformer_config_rejects_a_bad_moe_in_one_line():
    with pytest.raises(ValueError, match="moe.top_k"):
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=8,
                          moe=MoEConfig(num_experts=2, top_k=3, ffn_hidden_size=4))


def test_recompute_of_moe_layers_keeps_loss_and_gradients():
    ids, labels = batch(4)
    plain = loss_and_grads(moe_model(moe_config()), ids, labels)
    cfg = dataclasses.replace(moe_config(), precision=PrecisionConfig(recompute_layers="all"))
    again = loss_and_grads(moe_model(cfg), ids, labels)
    np.testing.assert_allclose(again[0], plain[0], rtol=1e-6)
    for name, grad in plain[4].items():
        np.testing.assert_allclose(again[4][name], grad, rtol=1e-5, atol=1e-7, err_msg=name)
