"""GPTModel pipeline stages in one process: parameter names and initial weights equal the
full model's, ``layer_range`` errors name the values, ``from_pretrained(stage=...)`` reads
exactly the stage's tensors and chained stages give the full model's hidden state / logits
(also decoding with per-stage KV caches), and the whole model as one stage through the pp=1
schedule equals the full model. Real-rank checks: ``test_gpt_pipeline.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from tests.models import gpt_pipeline_helpers as H  # noqa: E402


def _stage(spec, tie=False, **kw):
    import models

    return models.build_from_config(H.hf_config(tie), None, spec, **kw)


@pytest.mark.parametrize("tie", [False, True])
def test_stage_names_and_weights_are_the_full_models(tie):
    import models
    from models.gpt_pipeline import stage_specs

    full = {n: p.asnumpy().copy() for n, p in models.build_from_config(H.hf_config(tie))
            .parameters_and_names()}
    seen = []
    for spec in stage_specs(5, 2, 2, [2, 1, 1, 1]):
        model = _stage(spec, tie)
        held = dict(model.parameters_and_names())
        layers = {int(n.split(".")[2]) for n in held if n.startswith("decoder.layers.")}
        assert layers == set(spec.layer_range), (spec, sorted(held))
        assert model.decoder.layers.numbers == tuple(spec.layer_range)
        for name, param in held.items():
            np.testing.assert_array_equal(param.asnumpy(), full[name], err_msg=name)
        flagged = [n for n, p in held.items() if getattr(p, "shared_embedding", False)]
        ends = spec.pre_process or spec.post_process
        assert flagged == (["embedding.weight"] if tie and ends else []), (spec, flagged)
        seen += list(held)
    assert set(seen) == set(full)
    twice = sorted(n for n in set(seen) if seen.count(n) > 1)
    assert twice == (["embedding.weight"] if tie else []), twice
    one = models.build_from_config(H.hf_config(tie))  # both ends in one model: one weight, no flag
    assert not any(getattr(p, "shared_embedding", False) for p in one.trainable_params())


def test_layer_range_and_stage_errors_name_the_values(tmp_path):
    from mcore.transformer.block import TransformerBlock
    from models.gpt import StageSpec
    from models.gpt_pipeline import build_gpt_pipeline
    from mcore.parallel_state import ParallelDims

    model = _stage(StageSpec(True, True, range(5)))
    cfg, spec = model.config, model.hf.family.layer_spec(model.config)
    with pytest.raises(ValueError, match=r"layer_range=range\(3, 7\).*num_layers=5"):
        _stage(StageSpec(False, True, range(3, 7)))
    with pytest.raises(ValueError, match=r"range\(0, 4, 2\): step must be 1"):
        TransformerBlock(cfg, spec, layer_range=range(0, 4, 2))
    with pytest.raises(ValueError, match=r"layer_range=\[0, 1\]: must be a range"):
        TransformerBlock(cfg, spec, layer_range=[0, 1])
    with pytest.raises(ValueError, match=r"layers_per_stage \[6\].*num_layers \(5\)"):
        build_gpt_pipeline(H.hf_config(False), ParallelDims.single(), layers_per_stage=[6])
    middle = _stage(StageSpec(False, False, range(1, 2)))
    hidden = ms.Tensor(np.zeros((1, 4, 64), np.float32))
    assert middle(hidden).shape == (1, 4, 64)
    with pytest.raises(ValueError, match="labels given to a stage without post_process"):
        middle(hidden, labels=ms.Tensor(np.zeros((1, 4), np.int32)))
    with pytest.raises(ValueError, match=r"pipeline stage .*layer_range=range\(1, 2\)"):
        middle.save_pretrained(tmp_path)


class _Recorder:
    """``read_checkpoint`` whose tensors record which ones were loaded."""

    def __init__(self, read):
        self.read, self.loaded = read, set()

    def __call__(self, path):
        recorder = self

        class Lazy:
            def __init__(self, name, lazy):
                self.name, self.lazy, self.shape = name, lazy, lazy.shape

            def load(self):
                recorder.loaded.add(self.name)
                return self.lazy.load()

        return {n: Lazy(n, t) for n, t in self.read(path).items()}


def _boundary_hidden(full, ids, upto):
    """The full model's hidden state after its layers ``< upto`` (no final norm)."""
    from mindspore import ops

    b, s = ids.shape
    pos = ops.broadcast_to(ms.Tensor(np.arange(s, dtype=np.int32).reshape(1, s)), (b, s))
    cos, sin = full.rotary(pos)
    x = full.embedding(ids)
    for layer in list(full.decoder.layers)[:upto]:
        x = layer(x, cos, sin)
    return x.asnumpy()


@pytest.mark.parametrize("tie", [False, True])
def test_from_pretrained_stage_reads_only_its_tensors(monkeypatch, tie):
    import models
    import models.hf as hf
    from models.gpt import StageSpec

    ref = np.load(H.FIXTURE / "reference.npz")
    ids = ms.Tensor(ref["input_ids"])
    full = models.from_pretrained(H.FIXTURE, tie_word_embeddings=tie)
    want = full(ids).asnumpy()
    recorder = _Recorder(hf.read_checkpoint)
    monkeypatch.setattr(hf, "read_checkpoint", recorder)
    first = models.from_pretrained(H.FIXTURE, stage=StageSpec(True, False, range(0, 1)),
                                   tie_word_embeddings=tie)
    assert recorder.loaded == {"model.embed_tokens.weight"} | {
        n for n in hf.read_checkpoint.read(H.FIXTURE) if n.startswith("model.layers.0.")}
    recorder.loaded.clear()
    last = models.from_pretrained(H.FIXTURE, stage=StageSpec(False, True, range(1, 2)),
                                  tie_word_embeddings=tie)
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    assert recorder.loaded == {head, "model.norm.weight"} | {
        n for n in hf.read_checkpoint.read(H.FIXTURE) if n.startswith("model.layers.1.")}
    hidden = first(ids)
    np.testing.assert_array_equal(hidden.asnumpy(), _boundary_hidden(full, ids, 1))
    np.testing.assert_allclose(last(hidden).asnumpy(), want, rtol=0, atol=1e-5)
    if not tie:
        np.testing.assert_allclose(want, ref["logits"], rtol=0, atol=1e-4)
    if tie:
        np.testing.assert_array_equal(dict(last.parameters_and_names())["embedding.weight"]
                                      .asnumpy(), full.embedding.weight.asnumpy())
    assert set(hf.full_state(last)) == {n for n, _ in last.parameters_and_names()}


def test_stage_kv_caches_decode_like_the_full_model():
    import models
    from models.gpt import StageSpec

    ref = np.load(H.FIXTURE / "reference.npz")
    ids = ms.Tensor(ref["input_ids"])
    full = models.from_pretrained(H.FIXTURE)
    want = full(ids).asnumpy()
    first = models.from_pretrained(H.FIXTURE, stage=StageSpec(True, False, range(0, 1)))
    last = models.from_pretrained(H.FIXTURE, stage=StageSpec(False, True, range(1, 2)))
    caches = first.new_cache(), last.new_cache()
    assert len(caches[1].keys) == 1 and caches[1].first == 1
    parts = [last(first(ids[:, :6], cache=caches[0]), cache=caches[1]).asnumpy()]
    for t in range(6, ids.shape[1]):
        step = ids[:, t:t + 1]
        parts.append(last(first(step, cache=caches[0]), cache=caches[1]).asnumpy())
    assert caches[0].length == caches[1].length == ids.shape[1]
    np.testing.assert_allclose(np.concatenate(parts, 1), want, rtol=0, atol=2e-5)
    static = last.new_cache(2, 16)
    assert [p.name for p in static.keys] == ["k1"] and static.first == 1


def test_pp1_pipeline_equals_full_model():
    """The whole tied model as one compiled stage (pp = 1) through the schedule: one embedding
    weight, unflagged; ``sync_embedding_grads`` on the size-one group changes nothing. (The
    untied model and pp = 2 run on real ranks in ``test_gpt_pipeline``.)"""
    tie = True
    from mcore.parallel_state import ParallelDims
    from mcore.pipeline_parallel.schedules import get_forward_backward_func
    from models.gpt_pipeline import build_gpt_pipeline

    pipe = build_gpt_pipeline(H.hf_config(tie), ParallelDims.single(), jit=True)
    assert len(pipe.chunk_models) == 1 and pipe.stages[0].layer_range == range(5)
    assert not any(getattr(p, "shared_embedding", False) for p in pipe.chunks[0].params)
    fb = get_forward_backward_func(1)
    res = fb(H.forward_step, iter(H.batches(0)), pipe, H.M, H.SEQ, H.MBS)
    grads = pipe.sync_embedding_grads(res.grads)[0]   # size-one group: unchanged
    ref_loss, ref_grads = H.reference(tie)["steps"][0]
    assert H.rel(res.loss, ref_loss) <= 1e-5
    assert sorted(pipe.param_names[0]) == sorted(ref_grads)
    for name, g in zip(pipe.param_names[0], grads):
        assert H.rel(g.asnumpy(), ref_grads[name]) <= 1e-5, name


def test_build_gpt_pipeline_reads_weights_from_hf_path():
    import models
    from mcore.parallel_state import ParallelDims
    from models.gpt_pipeline import build_gpt_pipeline

    pipe = build_gpt_pipeline(None, ParallelDims.single(), jit=False, hf_path=H.FIXTURE)
    full = dict(models.from_pretrained(H.FIXTURE).parameters_and_names())
    assert len(pipe.param_names[0]) == len(pipe.chunks[0].params) == len(full)
    for name, param in zip(pipe.param_names[0], pipe.chunks[0].params):
        np.testing.assert_array_equal(param.asnumpy(), full[name].asnumpy(), err_msg=name)


def test_build_gpt_pipeline_refuses_a_tensor_the_model_does_not_use(tmp_path):
    import shutil
    from pathlib import Path

    from mcore.parallel_state import ParallelDims
    from models.errors import LoadError
    from models.gpt_pipeline import build_gpt_pipeline
    from models.safetensors_io import read_checkpoint, write_checkpoint

    tensors = {n: lazy.load() for n, lazy in read_checkpoint(H.FIXTURE).items()}
    tensors["model.layers.9.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    write_checkpoint(tmp_path, tensors)
    shutil.copy(Path(H.FIXTURE) / "config.json", tmp_path / "config.json")
    with pytest.raises(LoadError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        build_gpt_pipeline(None, ParallelDims.single(), jit=False, hf_path=tmp_path)
