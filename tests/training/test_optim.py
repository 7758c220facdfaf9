"""LR schedule values and the weight-decay mask."""
import math

import pytest

from training.config import load_config
from training.optim import lr_at, lr_schedule, should_decay, split_decay


def test_warmup_is_linear_and_reaches_peak():
    assert [lr_at(s, 1.0, 0.1, 4, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_decay_values():
    assert lr_at(4, 1.0, 0.1, 4, 14) == pytest.approx(1.0)
    assert lr_at(9, 1.0, 0.1, 4, 14) == pytest.approx(0.55)  # half way: (lr + min_lr) / 2
    assert lr_at(6, 1.0, 0.1, 4, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(14, 1.0, 0.1, 4, 14) == lr_at(100, 1.0, 0.1, 4, 14) == 0.1


def test_linear_and_constant():
    assert lr_at(9, 1.0, 0.1, 4, 14, "linear") == pytest.approx(0.55)
    assert lr_at(11, 1.0, 0.0, 4, 14, "linear") == pytest.approx(0.3)
    assert lr_at(0, 2.0, 0.0, 0, 10, "constant") == lr_at(50, 2.0, 0.0, 0, 10, "constant") == 2.0
    assert lr_at(0, 2.0, 0.0, 0, 10, "cosine") == 2.0  # no warmup: starts at peak
    with pytest.raises(ValueError, match="decay_style"):
        lr_at(0, 1.0, 0.0, 0, 1, "step")


def test_schedule_from_config_is_monotone_after_warmup():
    cfg = load_config(None, ["optimizer.warmup_iters=10", "training.train_iters=100"])
    sched = lr_schedule(cfg.optimizer, cfg.training.train_iters)
    values = [sched(s) for s in range(120)]
    assert values[9] == cfg.optimizer.lr and values[-1] == cfg.optimizer.min_lr
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


@pytest.mark.parametrize("name,ndim,decay", [
    ("layers.0.self_attn.q_proj.weight", 2, True),
    ("layers.0.mlp.down_proj.weight", None, True),
    ("embedding.word_embeddings.weight", 2, True),
    ("layers.0.self_attn.q_proj.bias", 1, False),
    ("layers.0.self_attn.qkv.bias", None, False),
    ("layers.0.input_layernorm.weight", None, False),
    ("layers.3.self_attn.q_norm.weight", None, False),
    ("final_norm.weight", None, False),
    ("ln_f.weight", None, False),
    ("some.vector", 1, False),
])
def test_weight_decay_mask(name, ndim, decay):
    assert should_decay(name, ndim) is decay


def test_split_decay():
    d, nd = split_decay(["a.weight", ("a.bias", 1), ("norm.weight", 1)])
    assert d == ["a.weight"] and nd == ["a.bias", "norm.weight"]
