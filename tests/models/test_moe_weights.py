"""Per-expert Hugging Face tensors <-> stacked expert parameters (``models.weights.ExpertStack``):
ep-sharded reads touch only the rank's experts, values are the transposed [gate; up] / down
matrices stacked in expert order, and ``to_hf`` writes the same names and values back."""
from __future__ import annotations

import numpy as np
import pytest

from models.errors import LoadError
from models.weights import NOT_STORED, ExpertStack, Piece, to_hf, to_local

E, H, F = 4, 6, 5


class Recorded:
    """A lazily loaded tensor that records every ``load``."""

    def __init__(self, array, log):
        self.array, self.shape, self.log = array, array.shape, log

    def load(self):
        self.log.append(self)
        return self.array


def _checkpoint(log):
    rng = np.random.default_rng(0)
    arrays = {}
    for e in range(E):
        arrays[f"x.{e}.w1.weight"] = rng.standard_normal((F, H)).astype(np.float32)
        arrays[f"x.{e}.w3.weight"] = rng.standard_normal((F, H)).astype(np.float32)
        arrays[f"x.{e}.w2.weight"] = rng.standard_normal((H, F)).astype(np.float32)
    return arrays, {k: Recorded(v, log) for k, v in arrays.items()}


TABLE = {
    "fc1": ExpertStack(tuple((Piece(f"x.{e}.w1.weight", F), Piece(f"x.{e}.w3.weight", F))
                             for e in range(E))),
    "fc2": ExpertStack(tuple((Piece(f"x.{e}.w2.weight"),) for e in range(E))),
    "router.expert_bias": NOT_STORED,
}


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_each_ep_rank_reads_only_its_experts(ep):
    n_local = E // ep
    params = {"fc1": (n_local, H, 2 * F), "fc2": (n_local, F, H), "router.expert_bias": (E,)}
    for rank in range(ep):
        log = []
        arrays, hf = _checkpoint(log)
        got = to_local(TABLE, hf, params, {}, tp=1, rank=0, ep_rank=rank)
        mine = range(rank * n_local, (rank + 1) * n_local)
        read = {name for name, t in hf.items() if t in log}
        assert read == {f"x.{e}.{w}.weight" for e in mine for w in ("w1", "w2", "w3")}
        assert set(got) == {"fc1", "fc2"}  # the expert bias is not stored in HF checkpoints
        for j, e in enumerate(mine):
            gate_up = np.concatenate([arrays[f"x.{e}.w1.weight"], arrays[f"x.{e}.w3.weight"]], 0)
            np.testing.assert_array_equal(got["fc1"][j], gate_up.T)  # [h, 2f] = [gate | up]
            np.testing.assert_array_equal(got["fc2"][j], arrays[f"x.{e}.w2.weight"].T)


def test_to_hf_writes_every_expert_back_under_its_name():
    log = []
    arrays, hf = _checkpoint(log)
    full = to_local(TABLE, hf, {"fc1": (E, H, 2 * F), "fc2": (E, F, H),
                                "router.expert_bias": (E,)}, {}, tp=1, rank=0)
    back = to_hf(TABLE, full)
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_to_hf_refuses_a_partial_expert_stack():
    with pytest.raises(ValueError, match=r"parameter fc2: 2 experts given, the table names 4"):
        to_hf({"fc2": TABLE["fc2"]}, {"fc2": np.zeros((2, F, H), np.float32)})


def test_expert_errors_name_the_tensor():
    log = []
    _, hf = _checkpoint(log)
    del hf["x.3.w3.weight"]
    params = {"fc1": (2, H, 2 * F), "fc2": (2, F, H), "router.expert_bias": (E,)}
    with pytest.raises(LoadError, match=r"missing tensor 'x\.3\.w3\.weight' \(for fc1\)"):
        to_local(TABLE, hf, params, {}, tp=1, rank=0, ep_rank=1)
    _, hf = _checkpoint(log)
    with pytest.raises(ValueError, match=r"shape mismatch for expert tensors x\.0\.w1\.weight"):
        to_local(TABLE, hf, {**params, "fc1": (2, H, 2 * F + 1)}, {}, tp=1, rank=0)
    with pytest.raises(ValueError, match=r"parameter fc1: 3 local experts of 4"):
        to_local(TABLE, hf, {**params, "fc1": (3, H, 2 * F)}, {}, tp=1, rank=0)
