"""Multi-token prediction (``mcore.transformer.mtp`` in ``GPTModel``), one process.

- the MTP losses and the total loss equal an independent composition written here: the same
  modules called on sequences SHORTENED by k (not the model's shifted-and-masked full length),
  projection, head and cross-entropy in numpy; tied and untied heads;
- gradients: the MTP term reaches the depths and the shared embedding / head; with
  ``loss_factor = 0`` the main parameters get exactly the gradients of a model without MTP;
- a tiny model trained with MTP through ``TrainStep`` (YAML ``model.mtp``) lowers both losses
  and reports ``mtp_metrics``;
- MoE depths: MTP losses equal the composition, their router losses and counts are the rows
  ``num_layers + d`` of ``aux`` / ``counts`` (in the loss), and a training step moves their
  expert biases by those rows;
- the errors: pipeline stages, sequence parallelism, bad config values.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

V, B, S = 64, 2, 9


def _config(depths=2, factor=0.3, **kw):
    from mcore.transformer.config import MTPConfig, TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                             ffn_hidden_size=32, mtp=MTPConfig(num_layers=depths,
                                                               loss_factor=factor), **kw)


def _model(cfg, tie=False):
    from mcore.transformer.layer_specs import gpt_layer_spec
    from models.gpt import GPTModel

    return GPTModel(cfg, gpt_layer_spec(cfg), V, tie_embeddings=tie)


def _batch(seed=0):
    tokens = np.random.default_rng(seed).integers(0, V, (B, S + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _cross_entropy(logits, labels):
    """Mean token cross-entropy in float64; ``logits [b, n, V]``, ``labels [b, n]``."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, labels[..., None].astype(np.int64), -1).mean())


def _composition(model, ids, labels):
    """``(lm_loss, [mtp loss per depth])`` from the model's modules, depth k on length s - k."""
    import mindspore as ms

    def rotary(n):
        pos = ms.Tensor(np.broadcast_to(np.arange(n, dtype=np.int32), (B, n)).copy())
        return model.rotary(pos)

    head = (model.embedding.weight if model.output_layer is None
            else model.output_layer.weight).asnumpy().astype(np.float64)  # [V, h]
    cos, sin = rotary(S)
    hidden = model.decoder(model.embedding(ms.Tensor(ids)), cos, sin).asnumpy()  # final-normed
    lm = _cross_entropy(hidden @ head.T, labels)
    losses = []
    for k, depth in enumerate(model.mtp.layers, start=1):
        n = S - k
        emb = depth.enorm(model.embedding(ms.Tensor(ids[:, k:]))).asnumpy()  # tokens t + k
        prev = depth.hnorm(ms.Tensor(hidden[:, :n])).asnumpy()
        x = np.concatenate([emb, prev], -1) @ depth.eh_proj.weight.asnumpy().T  # [b, n, h]
        cos, sin = rotary(n)
        hidden = depth.final_norm(depth.layer(ms.Tensor(x.astype(np.float32)), cos, sin)).asnumpy()
        losses.append(_cross_entropy(hidden @ head.T, labels[:, k:]))  # token t + k + 1
    return lm, losses


@pytest.mark.parametrize("tie", [False, True])
def test_mtp_loss_equals_independent_composition(tie):
    import mindspore as ms

    model = _model(_config(), tie)
    ids, labels = _batch()
    loss, lm, aux, _, mtp = (t.asnumpy() for t in model.loss_terms(ms.Tensor(ids),
                                                                     ms.Tensor(labels)))
    lm_ref, mtp_ref = _composition(model, ids, labels)
    np.testing.assert_allclose(lm, lm_ref, rtol=1e-5)
    np.testing.assert_allclose(mtp, mtp_ref, rtol=1e-5)
    np.testing.assert_allclose(loss, lm_ref + 0.3 * np.mean(mtp_ref) + aux.sum(), rtol=1e-5)
    assert abs(mtp[0] - mtp[1]) > 1e-4  # two different depths, not one loss twice
    with_aux = model.loss_with_aux(ms.Tensor(ids), ms.Tensor(labels))[0].asnumpy()
    np.testing.assert_allclose(with_aux, loss, rtol=1e-6)  # the MoE channel trains on it too


def _grads(model, ids, labels):
    import mindspore as ms

    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]

    def loss(x, y):
        return model.loss_terms(x, y)[0]

    grads = ms.grad(loss, grad_position=None, weights=ms.ParameterTuple([p for _, p in named]))(
        ms.Tensor(ids), ms.Tensor(labels))
    return {n: g.asnumpy() for (n, _), g in zip(named, grads)}


def test_mtp_gradients_reach_depths_and_shared_weights():
    ids, labels = _batch(1)
    plain = _grads(_model(_config(depths=0)), ids, labels)
    off = _grads(_model(_config(factor=0.0)), ids, labels)
    on = _grads(_model(_config()), ids, labels)
    assert set(off) - set(plain) == {n for n in off if n.startswith("mtp.")}
    for name, g in plain.items():  # factor 0: the main model's gradients, unchanged
        np.testing.assert_allclose(off[name], g, rtol=1e-5, atol=1e-8, err_msg=name)
    for name in ("embedding.weight", "output_layer.weight"):  # shared with the MTP depths
        assert np.abs(on[name] - plain[name]).max() > 1e-4, name
    for name, g in on.items():
        if name.startswith("mtp."):
            assert np.abs(g).max() > 0, name
    assert not any(np.abs(g).max() > 0 for n, g in off.items() if n.startswith("mtp."))


def test_training_with_mtp_lowers_both_losses():
    from mcore.parallel_state import ModelGroups, ParallelDims
    from training.config import load_config
    from training.model_bridge import build_gpt
    from training.step import TrainStep

    cfg = load_config(None, ["model.vocab_size=64", "model.hidden_size=16", "model.num_layers=1",
                             "model.num_heads=2", "model.num_kv_heads=2",
                             "model.ffn_hidden_size=32", "model.mtp.num_layers=2",
                             "model.mtp.loss_factor=0.5", "optimizer.warmup_iters=0"])
    model = build_gpt(cfg, groups=ModelGroups.single())
    assert model.mtp is not None and model.config.mtp.loss_factor == 0.5
    step = TrainStep(model, ParallelDims.single(), cfg.optimizer, grad_accum_steps=1)
    tokens = np.random.default_rng(2).integers(0, 64, (2, 11)).astype(np.int32)
    micro = [(tokens[:, :-1], tokens[:, 1:])]
    history = []
    for _ in range(6):
        loss, norm = step(micro, 3e-2)
        assert np.isfinite(norm)
        history.append((loss, step.last_mtp_metrics))
    (first, m0), (last, m1) = history[0], history[-1]
    assert set(m0) == {"mtp_loss", "mtp_loss_1", "mtp_loss_2"}
    assert last < 0.7 * first and m1["mtp_loss"] < 0.7 * m0["mtp_loss"], history


def test_mtp_errors_name_the_key():
    from mcore.transformer.config import MTPConfig, ParallelConfig
    from mcore.moe.config import MoEConfig
    from mcore.transformer.layer_specs import gpt_layer_spec, gpt_layer_specs
    from models.gpt import GPTModel

    cfg = _config()
    with pytest.raises(ValueError, match=r"^mtp.num_layers=2: .*pipeline"):
        GPTModel(cfg, gpt_layer_spec(cfg), V, pre_process=False)
    sp = dataclasses.replace(cfg, parallel=ParallelConfig(sequence_parallel=True))
    with pytest.raises(ValueError, match=r"^mtp.num_layers=2: .*sequence parallelism"):
        GPTModel(sp, gpt_layer_spec(sp), V)
    for kwargs, key in (({"num_layers": -1}, "mtp.num_layers"),
                        ({"loss_factor": -0.5}, "mtp.loss_factor")):
        with pytest.raises(ValueError, match=rf"^{key}="):
            MTPConfig(**kwargs)
    moe = _config(moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8))
    specs = gpt_layer_specs(moe)
    assert not GPTModel(moe, specs, V).mtp.layers[0].layer.is_moe  # default: a dense layer


def _moe_mtp_model(first_k_dense=0):
    """Two decoder layers (MoE from ``first_k_dense`` on) and two MoE MTP depths, every router
    loss on and the expert bias on."""
    from mcore.moe.config import MoEConfig
    from mcore.transformer.layer_specs import gpt_layer_specs
    from models.gpt import GPTModel

    cfg = _config(moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8, expert_bias=True,
                                first_k_dense=first_k_dense, aux_loss_coeff=0.1,
                                seq_aux_loss_coeff=0.05, z_loss_coeff=0.01))
    moe_spec = gpt_layer_specs(cfg)[-1]
    return GPTModel(cfg, gpt_layer_specs(cfg), V, mtp_layer_spec=moe_spec)


@pytest.mark.parametrize("first_k_dense", [0, 1])
def test_moe_mtp_depth_loss_equals_composition(first_k_dense):
    """MoE depths: the MTP losses equal the composition (dropless routing is per token, so the
    shortened sequences agree); their router losses and counts are rows ``num_layers + d`` of
    ``aux`` / ``counts``, equal to the depth's layer called on the model's shifted inputs, and
    ``loss = lm + aux.sum() + factor * mean(mtp)``. ``first_k_dense=1``: the depths' rows follow
    the one MoE decoder layer's."""
    import mindspore as ms
    from mcore.transformer.mtp import shift_left
    from training.moe_step import bias_routers

    model = _moe_mtp_model(first_k_dense)
    decoder_moe = (0, 1)[first_k_dense:]
    assert model.moe_layers == decoder_moe + (2, 3)
    ids, labels = _batch(3)
    loss, lm, aux, counts, mtp = (t.asnumpy() for t in model.loss_terms(ms.Tensor(ids),
                                                                         ms.Tensor(labels)))
    lm_ref, mtp_ref = _composition(model, ids, labels)
    np.testing.assert_allclose(lm, lm_ref, rtol=1e-5)
    np.testing.assert_allclose(mtp, mtp_ref, rtol=1e-5)
    assert aux.shape == (len(model.moe_layers), 3) and counts.shape == (len(model.moe_layers), 4)
    # the depths' rows, recomputed from the modules on the full (shifted, filled) length
    x = ms.Tensor(ids)
    pos = ms.Tensor(np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy())
    cos, sin = model.rotary(pos)
    hidden = model.decoder(model.embedding(x), cos, sin)
    rows = len(decoder_moe)
    for k, depth in enumerate(model.mtp.layers, start=1):
        emb = model.embedding(shift_left(x, k, 0))
        h_in = depth.eh_proj(ms.ops.concat((depth.enorm(emb), depth.hnorm(hidden)), -1))
        out, a, c = depth.layer.forward_with_aux(h_in, cos, sin)
        hidden = depth.final_norm(out)
        np.testing.assert_allclose(aux[rows + k - 1], a.asnumpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(counts[rows + k - 1], c.asnumpy())
        assert counts[rows + k - 1].sum() == B * S * 2 and (a.asnumpy() > 0).all()
    np.testing.assert_allclose(loss, lm_ref + aux.sum() + 0.3 * np.mean(mtp_ref), rtol=1e-5)
    with_aux = model.loss_with_aux(ms.Tensor(ids), ms.Tensor(labels))
    np.testing.assert_allclose(with_aux[0].asnumpy(), loss, rtol=1e-6)
    np.testing.assert_array_equal(with_aux[3].asnumpy(), counts)
    routers = bias_routers(model)  # the depths' routers move with rows 2 and 3 of the counts
    assert [row for row, _ in routers] == list(range(len(model.moe_layers)))
    assert routers[-1][1] is model.mtp.layers[1].layer.mlp.router


def test_training_moves_the_mtp_depths_expert_bias():
    """``TrainStep`` trains a model with MoE depths; each depth's router bias moves by its own
    counts (rows ``num_layers + d``) like the decoder's routers."""
    from mcore.parallel_state import ParallelDims
    from training.config import load_config
    from training.step import TrainStep

    model = _moe_mtp_model()
    opt = load_config(None, ["optimizer.warmup_iters=0"]).optimizer
    step = TrainStep(model, ParallelDims.single(), opt, grad_accum_steps=1)
    assert len(step.bias_routers) == 4
    ids, labels = _batch(4)
    before = [r.expert_bias.asnumpy().copy() for _, r in step.bias_routers]
    loss, norm = step([(ids, labels)], 1e-2)
    assert np.isfinite(loss) and np.isfinite(norm)
    counts = step.last_moe_counts
    assert counts.shape == (4, 4)
    rate = model.config.moe.bias_update_rate
    for (row, router), b0 in zip(step.bias_routers, before):
        load = counts[row]
        expect = b0 + rate * np.sign(load.mean() - load)
        np.testing.assert_allclose(router.expert_bias.asnumpy(), expect, rtol=1e-6, atol=1e-7)
    assert np.abs(step.bias_routers[3][1].expert_bias.asnumpy() - before[3]).max() > 0


@pytest.mark.parametrize("override, expect", [
    (["model.mtp.num_layers=1", "parallel.pp=2"], "model.mtp.num_layers=1 with parallel.pp=2"),
    (["model.mtp.num_layers=1", "parallel.tp=2", "parallel.sp=true"],
     "model.mtp.num_layers=1 with parallel.sp=true"),
    (["model.mtp.loss_factor=-1"], "model.mtp.loss_factor must be >= 0"),
    (["model.mtp.num_layers=-1"], "model.mtp.num_layers must be >= 0"),
])
def test_yaml_errors_are_one_line(override, expect):
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, override, world_size=2)
    assert expect in str(err.value) and "\n" not in str(err.value)


def check_mtp_tp_parity(ctx, dims) -> None:
    """Run by ``tests/models/test_tp_parity.py``'s two-rank worker (``dims``: tp=2): three
    ``TrainStep``s of a tiny model with two MTP depths at tp=2 give the one-process model's
    loss, gradient norm and per-depth MTP losses at every step (same data on both ranks)."""
    from mcore.parallel_state import ModelGroups, ParallelDims
    from training.config import load_config
    from training.model_bridge import build_gpt
    from training.step import TrainStep

    cfg = load_config(None, ["model.vocab_size=64", "model.hidden_size=16", "model.num_layers=1",
                             "model.num_heads=2", "model.num_kv_heads=2",
                             "model.ffn_hidden_size=32", "model.mtp.num_layers=2",
                             "model.mtp.loss_factor=0.5", "optimizer.warmup_iters=0",
                             "parallel.tp=2"], world_size=2)
    rng = np.random.default_rng(5)
    with ctx.check("mtp_training_tp2_matches_tp1"):
        one = TrainStep(build_gpt(cfg, groups=ModelGroups.single()), ParallelDims.single(),
                        cfg.optimizer, grad_accum_steps=1)
        two = TrainStep(build_gpt(cfg, groups=ModelGroups.from_dims(dims)), dims, cfg.optimizer,
                        grad_accum_steps=1)
        for step in range(3):
            tokens = rng.integers(0, 64, (2, 11)).astype(np.int32)
            micro = [(tokens[:, :-1], tokens[:, 1:])]
            (l1, g1), (l2, g2) = one(micro, 3e-2), two(micro, 3e-2)
            m1, m2 = one.last_mtp_metrics, two.last_mtp_metrics
            assert abs(l2 - l1) <= 1e-5 * abs(l1), (step, l1, l2)
            assert abs(g2 - g1) <= 1e-5 * g1, (step, g1, g2)
            assert sorted(m1) == sorted(m2) == ["mtp_loss", "mtp_loss_1", "mtp_loss_2"]
            for key in m1:
                assert abs(m2[key] - m1[key]) <= 1e-5 * abs(m1[key]), (step, key, m1, m2)
