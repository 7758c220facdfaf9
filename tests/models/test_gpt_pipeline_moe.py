"""A MoE GPTModel as two pipeline stages in one process (layers 0-1 | layer 2 + head; layers 1
and 2 are MoE): the stage steps the schedules run (``forward_with_aux`` -> ``loss_grads_and_aux``
-> ``backward`` with the output gradient) give, summed over two micro-batches, the full model's
gradients of ``mean(lm_loss + aux.sum())`` times the loss scale, including the router losses of
the FIRST stage's layer (whose gradient only that stage's own backward can add), and the full
model's aux and tokens-per-expert rows; Mixtral and Qwen3-MoE checkpoints load per stage.
Real ranks (ep x pp x vpp): tests/training/test_pretrain_moe.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from tests.models.moe_helpers import VOCAB, batch, loss_and_grads, moe_config  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
SCALE = 8.0  # a loss scale, as fp16 training passes through the schedule


def _model(cfg, pre: bool, post: bool, layers: range):
    from mcore.transformer.layer_specs import gpt_layer_specs, moe_mlp_spec
    from models import GPTModel

    specs = gpt_layer_specs(cfg, moe_mlp_spec(dispatcher="AllGatherDispatcher"))
    return GPTModel(cfg, specs, VOCAB, pre_process=pre, post_process=post, layer_range=layers)


def _runner(model):
    from mcore.parallel_state import ProcessGroup
    from mcore.pipeline_parallel.stage import PipelineStage, StageRunner
    from models.gpt_pipeline import GPTStage, VocabParallelMeanLoss

    loss = VocabParallelMeanLoss(ProcessGroup.single()) if model.post_process else None
    stage = PipelineStage([GPTStage(model, with_aux=True)], loss_fn=loss,
                          is_first=model.pre_process, with_aux=True)
    return StageRunner(stage, jit=True)


def _named(runner, model, grads):
    by_id = {id(p): n for n, p in model.parameters_and_names()}
    return {by_id[id(p)]: g.asnumpy() for p, g in zip(runner.params, grads)}


def test_moe_stages_carry_their_router_losses_into_the_gradients():
    cfg = moe_config(expert_bias=True)
    first, last = _model(cfg, True, False, range(0, 2)), _model(cfg, False, True, range(2, 3))
    assert first.moe_layers == (1,) and last.moe_layers == (2,)
    r0, r1 = _runner(first), _runner(last)
    micro = [batch(1), batch(2)]
    m = len(micro)
    got = {}
    for ids, labels in micro:
        out, aux0, counts0 = r0.forward_with_aux(ms.Tensor(ids))
        loss, dx, dw1, aux1, counts1 = r1.loss_grads_and_aux(out, ms.Tensor(labels), SCALE / m)
        _, dw0 = r0.backward(ms.Tensor(ids), dx, SCALE / m)
        for name, g in [*_named(r0, first, dw0).items(), *_named(r1, last, dw1).items()]:
            got[name] = got.get(name, 0.0) + g / SCALE
        full = _model(cfg, True, True, range(3))
        _, lm, aux, counts, _ = loss_and_grads(full, ids, labels)
        assert abs(float(loss.asnumpy()) - lm) <= 1e-6 * abs(lm)
        np.testing.assert_allclose(np.concatenate([aux0.asnumpy(), aux1.asnumpy()]), aux,
                                   rtol=1e-6)
        np.testing.assert_array_equal(np.concatenate([counts0.asnumpy(), counts1.asnumpy()]),
                                      counts)
    want, lm_only = {}, {}
    for ids, labels in micro:
        for target, coeffs in ((want, {}), (lm_only, {"aux_loss_coeff": 0.0, "z_loss_coeff": 0.0})):
            grads = loss_and_grads(_model(moe_config(expert_bias=True, **coeffs), True, True,
                                          range(3)), ids, labels)[4]
            for name, g in grads.items():
                target[name] = target.get(name, 0.0) + g / m
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-7, err_msg=name)
    router = "decoder.layers.1.mlp.router.weight"  # first stage: its aux reaches it locally
    assert np.abs(want[router] - lm_only[router]).max() > 100 * np.abs(want[router]).max() * 2e-5


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_hf_moe_checkpoint_loads_per_stage(family):
    """``from_pretrained(stage=...)`` of a MoE family: each stage holds only its layers' experts
    and the chained stages give the transformers logits of the fixture (as the full model)."""
    import models
    from models.gpt import StageSpec

    path = FIXTURES / family
    ref = np.load(path / "reference.npz")
    first = models.from_pretrained(path, stage=StageSpec(True, False, range(0, 1)))
    last = models.from_pretrained(path, stage=StageSpec(False, True, range(1, 2)))
    assert last.moe_layers == (1,) and first.moe_layers == ((0,) if family == "mixtral" else ())
    for model, layer in ((first, 0), (last, 1)):
        held = {n.split(".")[2] for n, _ in model.parameters_and_names() if ".layers." in n}
        assert held == {str(layer)}, held
    logits = last(first(ms.Tensor(ref["input_ids"]))).asnumpy()
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-4)
