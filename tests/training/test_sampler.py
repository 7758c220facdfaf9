"""Sampler: fixed-length samples, deterministic shuffled order, dp split, exact resume."""
import json

import numpy as np
import pytest

from training.data.sampler import EvalBatches, GPTBatchSampler, GPTSampleDataset, split_samples


def test_samples_are_shifted_windows():
    tokens = np.arange(101, dtype=np.uint16)
    ds = GPTSampleDataset(tokens, seq_length=10)
    assert len(ds) == 10
    np.testing.assert_array_equal(ds[3], np.arange(30, 41))
    x, y = ds.batch([0, 9])
    np.testing.assert_array_equal(x[1], np.arange(90, 100))
    np.testing.assert_array_equal(y[1], np.arange(91, 101))
    with pytest.raises(IndexError):
        ds[10]


def test_train_valid_split_is_disjoint():
    tokens = np.arange(1001)
    train, valid = split_samples(tokens, 10, 0.2)
    assert (len(train), len(valid)) == (80, 20)
    train_tok = {int(t) for i in range(len(train)) for t in train[i][:-1]}
    valid_tok = {int(t) for i in range(len(valid)) for t in valid[i][:-1]}
    assert not train_tok & valid_tok


def _run(sampler, steps):
    return [np.concatenate(sampler.next_step()) for _ in range(steps)]


def test_deterministic_and_seed_dependent():
    a = _run(GPTBatchSampler(100, 2, 8, seed=1), 30)
    b = _run(GPTBatchSampler(100, 2, 8, seed=1), 30)
    c = _run(GPTBatchSampler(100, 2, 8, seed=2), 30)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))


def test_epochs_cover_every_sample_once_and_reshuffle():
    s = GPTBatchSampler(40, 2, 8, seed=3)  # 5 global batches per epoch
    epoch0 = np.concatenate(_run(s, 5))
    epoch1 = np.concatenate(_run(s, 5))
    assert sorted(epoch0) == list(range(40)) == sorted(epoch1)
    assert (epoch0 != epoch1).any() and s.epoch == 2


def test_dp_ranks_split_the_same_global_batch():
    dp = 4
    single = GPTBatchSampler(200, 2, 16, dp_rank=0, dp_size=1, seed=5)
    ranks = [GPTBatchSampler(200, 2, 16, dp_rank=r, dp_size=dp, seed=5) for r in range(dp)]
    for _ in range(25):
        whole = np.concatenate(single.next_step())
        parts = [r.next_step() for r in ranks]
        assert all(len(p) == 2 and all(len(mb) == 2 for mb in p) for p in parts)  # accum 2 x micro 2
        flat = [np.concatenate(p) for p in parts]
        assert len(set(np.concatenate(flat).tolist())) == 16  # disjoint
        np.testing.assert_array_equal(np.concatenate(flat), whole)  # the same global batch


def test_resume_is_exact_through_json():
    ref = GPTBatchSampler(97, 3, 12, dp_rank=1, dp_size=2, seed=9)
    expected = _run(ref, 40)
    s = GPTBatchSampler(97, 3, 12, dp_rank=1, dp_size=2, seed=9)
    _run(s, 13)
    state = json.loads(json.dumps(s.state_dict()))
    resumed = GPTBatchSampler(97, 3, 12, dp_rank=1, dp_size=2, seed=9)
    resumed.load_state_dict(state)
    for want, got in zip(expected[13:], _run(resumed, 27)):
        np.testing.assert_array_equal(want, got)
    with pytest.raises(ValueError, match="seed"):
        GPTBatchSampler(97, 3, 12, dp_rank=1, dp_size=2, seed=10).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        GPTBatchSampler(98, 3, 12, dp_rank=1, dp_size=2, seed=9).load_state_dict(state)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="divisible"):
        GPTBatchSampler(100, 3, 8)
    with pytest.raises(ValueError, match="global batch"):
        GPTBatchSampler(5, 1, 8)


def test_eval_batches_fixed_and_disjoint_across_ranks():
    ranks = [EvalBatches(50, 4, r, 2) for r in range(2)]
    a = [ranks[r].batches(3) for r in range(2)]
    assert all((x == y).all() for x, y in zip(a[0], ranks[0].batches(3)))
    for b in range(3):
        assert not set(a[0][b].tolist()) & set(a[1][b].tolist())
