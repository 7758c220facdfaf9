"""Single-process tests of mcore.tensor_parallel: numpy references at tp=1, construction with
fake tp groups (no communication happens while building a layer), errors, RNG, recompute and
hypothesis properties. The multi-rank equivalence tests live in test_tensor_parallel.py."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.mcore.tp_reference import (assert_close, build_mlp, cross_entropy_ref, data,
                                      loss_and_grads, set_biases)

import mindspore as ms  # noqa: E402
ms.set_device("CPU")

from mindspore import nn, ops  # noqa: E402

from mcore import tensor_parallel as tp  # noqa: E402
from mcore.parallel_state import ProcessGroup  # noqa: E402

ONE = ProcessGroup.single("tp")


def fake_group(size: int, rank: int) -> ProcessGroup:
    """A tp group of ``size`` seen from ``rank``, never used to communicate."""
    return ProcessGroup("tp", tuple(range(size)), rank, f"fake_{size}")


def gelu_ref(x):
    return ops.gelu(ms.Tensor(x)).asnumpy()


# ---- cross-entropy ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pynative", "jit"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_cross_entropy_matches_numpy(mode, smoothing, scale):
    from tests.ms_helpers import compiler

    logits = data((2, 5, 11), 1, scale)
    labels = np.random.default_rng(2).integers(0, 11, (2, 5)).astype(np.int32)
    labels[0, 1] = labels[1, 4] = -100
    ref_loss, ref_grad = cross_entropy_ref(logits, labels, -100, smoothing)

    class Loss(nn.Cell):
        def construct(self, z, y):
            loss = tp.vocab_parallel_cross_entropy(z, y, ONE, -100, smoothing)
            return loss.sum(), loss

    fn = ms.value_and_grad(Loss(), grad_position=0, has_aux=True)
    (_, loss), grad = compiler(mode)(fn)(ms.Tensor(logits), ms.Tensor(labels))
    assert np.isfinite(loss.asnumpy()).all() and np.isfinite(grad.asnumpy()).all()
    assert_close(loss.asnumpy(), ref_loss, "loss", rtol=1e-5 if scale < 10 else 1e-6)
    assert_close(grad.asnumpy(), ref_grad, "grad")
    assert (loss.asnumpy()[labels == -100] == 0).all()


def test_masked_mean_counts_only_valid_tokens():
    loss = ms.Tensor(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32))
    labels = ms.Tensor(np.array([[1, -100, 2], [3, 4, -100]], np.int32))
    mask = ms.Tensor(np.array([[1, 1, 1], [0, 1, 1]], np.float32))
    assert tp.masked_mean(loss, labels).asnumpy() == pytest.approx((1 + 3 + 4 + 5) / 4)
    assert tp.masked_mean(loss, labels, loss_mask=mask).asnumpy() == pytest.approx((1 + 3 + 5) / 3)
    assert tp.masked_mean(loss, labels, -100, mask * 0).asnumpy() == 0.0


# ---- layers at tp=1 against numpy -----------------------------------------------------------

def test_mlp_tp1_matches_numpy():
    net = build_mlp(8, 16, ONE)
    set_biases(net, ONE)
    x, w = data((2, 4, 8), 1), data((2, 4, 8), 2)
    out, dx, grads = loss_and_grads(net, x, w, "pynative")
    A, a = net.fc1.weight.asnumpy(), net.fc1.bias.asnumpy()
    B, b = net.fc2.weight.asnumpy(), net.fc2.bias.asnumpy()
    h = x @ A.T + a
    assert_close(out, gelu_ref(h) @ B.T + b, "out")
    assert_close(grads["fc2.bias"], w.sum((0, 1)), "d fc2.bias")
    assert_close(grads["fc2.weight"], np.einsum("bso,bsi->oi", w, gelu_ref(h)), "d fc2.weight")


def test_embedding_tp1_matches_numpy_lookup():
    emb = tp.VocabParallelEmbedding(13, 4, ONE, seed=5)
    ids = np.array([[0, 12, 5], [5, 1, 7]], np.int32)
    table = tp.init_master((13, 4), 5)
    np.testing.assert_array_equal(emb(ms.Tensor(ids)).asnumpy(), table[ids])
    _, _, grads = loss_and_grads(emb, ids, np.ones((2, 3, 4), np.float32), "pynative")
    counts = np.bincount(ids.ravel(), minlength=13)[:, None] * np.ones((1, 4))
    np.testing.assert_array_equal(grads["weight"], counts)


# ---- initialisation: the same full matrices for every tp size --------------------------------

@pytest.mark.parametrize("size", [2, 4])
def test_shards_of_any_tp_size_merge_to_the_tp1_weights(size):
    def build(group):
        col = tp.ColumnParallelLinear(8, 16, group, name="fc1")
        row = tp.RowParallelLinear(16, 8, group, name="fc2")
        emb = tp.VocabParallelEmbedding(13, 8, group, name="emb")
        return col, row, emb

    full = [layer.weight.asnumpy() for layer in build(ONE)]
    parts = [build(fake_group(size, r)) for r in range(size)]
    np.testing.assert_array_equal(tp.merge([p[0].weight for p in parts], 0), full[0])
    np.testing.assert_array_equal(tp.merge([p[1].weight for p in parts], 1), full[1])
    vocab = tp.merge([p[2].weight for p in parts], 0)  # padded to a multiple of size
    assert vocab.shape[0] == tp.padded_size(13, size)
    np.testing.assert_array_equal(vocab[:13], full[2])
    assert not vocab[13:].any()


# ---- errors name the layer and the sizes ---------------------------------------------------

def test_indivisible_sizes_name_layer_and_sizes():
    g4 = fake_group(4, 0)
    with pytest.raises(ValueError, match="ColumnParallelLinear 'fc1': output_size 10 is not "
                                         "divisible by tp size 4"):
        tp.ColumnParallelLinear(8, 10, g4, name="fc1")
    with pytest.raises(ValueError, match="RowParallelLinear 'fc2': input_size 6 is not "
                                         "divisible by tp size 4"):
        tp.RowParallelLinear(6, 8, g4, name="fc2")
    with pytest.raises(ValueError, match="gather_output and sequence_parallel"):
        tp.ColumnParallelLinear(8, 8, g4, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="size 6 is not divisible by tp size 4"):
        tp.shard(np.zeros((6, 2)), 4, 0, 0)
    with pytest.raises(ValueError, match="dimension 1 of size 6 is not divisible by the tp group "
                                         "size 4"):
        tp.ScatterToSPRegion(g4)(ms.Tensor(np.zeros((2, 6, 8), np.float32)))


# ---- RNG -------------------------------------------------------------------------------------

def test_tracker_seeds_follow_megatron_offsets():
    t0, t1 = tp.model_parallel_seed(42, tp_rank=0), tp.model_parallel_seed(42, tp_rank=1)
    assert t0.seed(tp.DEFAULT) == t1.seed(tp.DEFAULT) == 42
    assert t0.seed(tp.MODEL_PARALLEL) == 42 + 2718 and t1.seed(tp.MODEL_PARALLEL) == 42 + 2719
    assert t1.seed(tp.EXPERT_PARALLEL) == 42 + 1024 + 1
    assert [t0.next_seed() for _ in range(3)] == [t1.next_seed() for _ in range(3)]
    assert t0.next_seed(tp.MODEL_PARALLEL) != t1.next_seed(tp.MODEL_PARALLEL)
    with pytest.raises(KeyError, match="no state 'nope'"):
        t0.seed("nope")


def test_dropout_is_seeded_scaled_and_off_in_eval():
    x = ms.Tensor(np.ones((4, 64), np.float32))
    a, b = tp.Dropout(0.5, 9)(x).asnumpy(), tp.Dropout(0.5, 9)(x).asnumpy()
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 2.0} and 0.3 < (a == 0).mean() < 0.7
    assert not (tp.Dropout(0.5, 10)(x).asnumpy() == a).all()
    off = tp.Dropout(0.5, 9)
    off.set_train(False)
    np.testing.assert_array_equal(off(x).asnumpy(), x.asnumpy())


# ---- recompute -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pynative", "jit"])
@pytest.mark.parametrize("how", ["checkpoint", "Recompute"])
def test_recompute_gives_identical_gradients(mode, how):
    plain = build_mlp(8, 16, ONE)
    set_biases(plain, ONE)
    x, w = data((2, 4, 8), 1), data((2, 4, 8), 2)
    ref = loss_and_grads(plain, x, w, mode)

    class Checkpointed(nn.Cell):
        def __init__(self):
            super().__init__()
            self.block = plain if how == "checkpoint" else tp.Recompute(plain)

        def construct(self, t):
            if how == "checkpoint":
                return tp.checkpoint(self.block, t)
            return self.block(t)

    got = loss_and_grads(Checkpointed(), x, w, mode)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    for name, g in ref[2].items():
        key = [k for k in got[2] if k.endswith(name)]
        np.testing.assert_array_equal(got[2][key[0]], g, err_msg=name)


def test_recompute_runs_the_forward_again_in_pynative():
    class Counting(nn.Cell):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def construct(self, t):
            self.calls += 1
            return ops.tanh(t)

    block = Counting()
    ms.grad(_sum_of(tp.Recompute(block)))(ms.Tensor(np.ones((2, 2), np.float32)))
    assert block.calls == 2


def _sum_of(cell):
    def fn(t):
        return cell(t).sum()

    return fn


# ---- hypothesis properties over shapes -------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4),
                   st.sampled_from([1, 2, 4]))  # batch, seq / tp, hidden / tp, tp


@settings(max_examples=25, deadline=None)
@given(shapes, st.data())
def test_scatter_mappings_keep_own_slice(shape, draw):
    b, s, h, size = shape
    rank = draw.draw(st.integers(0, size - 1))
    x = data((b, s * size, h * size), b + s + h)
    g = fake_group(size, rank) if size > 1 else ONE
    got_tp = tp.ScatterToTPRegion(g)(ms.Tensor(x)).asnumpy()
    got_sp = tp.ScatterToSPRegion(g)(ms.Tensor(x)).asnumpy()
    np.testing.assert_array_equal(got_tp, np.split(x, size, -1)[rank])
    np.testing.assert_array_equal(got_sp, np.split(x, size, 1)[rank])


@settings(max_examples=15, deadline=None)
@given(shapes)
def test_size_one_mappings_are_identity_with_identity_gradient(shape):
    b, s, h, _ = shape
    x = ms.Tensor(data((b, s, h), 3))
    for cell in (tp.CopyToTPRegion(ONE), tp.ReduceFromTPRegion(ONE), tp.ScatterToTPRegion(ONE),
                 tp.GatherFromTPRegion(ONE), tp.ScatterToSPRegion(ONE), tp.GatherFromSPRegion(ONE),
                 tp.ReduceScatterToSPRegion(ONE)):
        np.testing.assert_array_equal(cell(x).asnumpy(), x.asnumpy())
        grad = ms.grad(_sum_of(cell))(x).asnumpy()
        np.testing.assert_array_equal(grad, np.ones((b, s, h), np.float32))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 2))
def test_shard_merge_roundtrip(size, n, dim):
    shape = [2, 3, 2]
    shape[dim] = n * size
    full = data(tuple(shape), n)
    parts = [tp.shard(full, size, r, dim) for r in range(size)]
    assert all(p.shape[dim] == full.shape[dim] // size for p in parts)
    np.testing.assert_array_equal(tp.merge(parts, dim), full)
    np.testing.assert_array_equal(tp.merge([tp.shard(ms.Tensor(full), size, r, dim)
                                            for r in range(size)], dim), full)


# ---- options and edge cases ----------------------------------------------------------------

def test_skip_bias_add_returns_bias_separately():
    col = tp.ColumnParallelLinear(4, 6, ONE, skip_bias_add=True, name="c")
    col.bias.set_data(ms.Tensor(data((6,), 1)))
    x = data((2, 3, 4), 2)
    out, bias = col(ms.Tensor(x))
    assert_close(out.asnumpy(), x @ col.weight.asnumpy().T, "out")
    np.testing.assert_array_equal(bias.asnumpy(), col.bias.asnumpy())
    assert tp.RowParallelLinear(4, 6, ONE, bias=False).bias is None


def test_megatron_named_functions_are_identity_on_size_one():
    x = ms.Tensor(data((2, 4, 6), 1))
    for fn in (tp.copy_to_tensor_model_parallel_region, tp.reduce_from_tensor_model_parallel_region,
               tp.scatter_to_tensor_model_parallel_region,
               tp.gather_from_tensor_model_parallel_region, tp.scatter_to_sequence_parallel_region,
               tp.gather_from_sequence_parallel_region,
               tp.reduce_scatter_to_sequence_parallel_region):
        np.testing.assert_array_equal(fn(x, ONE).asnumpy(), x.asnumpy(), err_msg=fn.__name__)


@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_sequence_not_divisible_names_the_layer(mode):
    from tests.ms_helpers import compiler

    row = tp.RowParallelLinear(8, 4, fake_group(2, 0), sequence_parallel=True, name="fc2")
    with pytest.raises(ValueError, match="RowParallelLinear 'fc2': sequence length 3 .* is not "
                                         "divisible by tp size 2"):
        compiler(mode)(row)(ms.Tensor(np.zeros((1, 3, 4), np.float32)))
    emb = tp.VocabParallelEmbedding(8, 4, fake_group(2, 0), sequence_parallel=True, name="emb")
    with pytest.raises(ValueError, match="VocabParallelEmbedding 'emb': sequence length 5"):
        compiler(mode)(emb)(ms.Tensor(np.zeros((1, 5), np.int32)))


def test_embedding_ids_outside_the_vocabulary_embed_to_zero():
    emb = tp.VocabParallelEmbedding(5, 3, ONE)
    out = emb(ms.Tensor(np.array([[0, 5, -1]], np.int32))).asnumpy()
    assert out[0, 0].any() and not out[0, 1:].any()


def test_cross_entropy_lse_output_and_its_gradient():
    logits = data((1, 2, 6), 3)
    labels = np.array([[1, 4]], np.int32)
    cell = tp.VocabParallelCrossEntropy(ONE)

    def z_loss(z):
        return cell(z, ms.Tensor(labels))[1].sum()  # sum of log-sum-exp

    z = logits.astype(np.float64)
    lse = np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(cell(ms.Tensor(logits), ms.Tensor(labels))[1].asnumpy(), lse,
                               rtol=1e-6)
    assert_close(ms.grad(z_loss)(ms.Tensor(logits)).asnumpy(), np.exp(z - lse[..., None]), "dlse")


def test_fused_partitions_give_the_same_master_weight_for_every_tp_size():
    """A fused [q; k; v] weight: each part is split on its own, rank r holds [q_r; k_r; v_r]."""
    import numpy as np

    from mcore.tensor_parallel.random import init_master, init_shard

    shape, parts = (16, 3), (8, 4, 4)
    master = init_master(shape, seed=5)
    for tp in (1, 2, 4):
        shards = [init_shard(shape, 5, tp, r, 0, partitions=parts) for r in range(tp)]
        for name, start, size in (("q", 0, 8), ("k", 8, 4), ("v", 12, 4)):
            offset = sum(p // tp for p in parts[:"qkv".index(name)])
            rebuilt = np.concatenate([s[offset:offset + size // tp] for s in shards], 0)
            np.testing.assert_array_equal(rebuilt, master[start:start + size], err_msg=name)
    with pytest.raises(ValueError, match=r"partitions \(8, 4\) do not add up to dimension 0"):
        init_shard(shape, 5, 2, 0, 0, partitions=(8, 4))
