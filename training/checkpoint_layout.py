"""This rank's parameters and optimizer state <-> global checkpoint tensors (``mcore.checkpoint``).

Every parameter is saved under its full-model name (pipeline stages already name their layers
by global index) with a ``ShardSpec``: split over tp along the layer's ``shard_dims`` dim (fused
q/k/v and gate/up parameters part by part: their part sizes come from the family's weight
table), stacked experts offset by their expert-parallel rank on dim 0 and split over etp. The
moments ``adam_m.<name>`` / ``adam_v.<name>`` share the parameter's spec; a distributed-optimizer
rank saves its pieces as flat ranges of that spec.

Who writes (each global element once): a dense parameter's owner has dp rank 0 (and cp rank 0),
and tp rank 0 unless the parameter is split over tp; an expert parameter's owner has edp rank 0,
and etp rank 0 unless it is split over etp; the last stage's copy of a tied embedding is never
written (it equals the first stage's, which it loads). Distributed-optimizer pieces are written
by every dp and cp rank (the optimizer shards over dp x cp: each holds different elements)
under the same tp / tied-copy rule.
"""
from __future__ import annotations

from dataclasses import dataclass

from mcore.checkpoint import Shard, ShardSpec, shard_spec
from models.weights import ExpertStack, split_dims


@dataclass(frozen=True)
class ParamEntry:
    spec: ShardSpec
    owner: bool  # this rank writes the parameter (and its whole moments)
    piece_owner: bool  # this rank writes its distributed-optimizer pieces of the moments


def chunk_models(step_fn) -> list:
    """The ``GPTModel``s a training step updates (one, or a pipeline rank's chunks)."""
    pipeline = getattr(step_fn, "pipeline", None)
    return list(pipeline.chunk_models) if pipeline is not None else [step_fn.model]


def _parts(plist, dim) -> list[int] | None:
    """Global extents of the fused parts of a parameter along its split ``dim``."""
    pieces = plist.experts[0] if isinstance(plist, ExpertStack) else plist
    fused_dim = 2 if isinstance(plist, ExpertStack) else 0  # pieces concatenate along this dim
    if not pieces or len(pieces) < 2 or dim != fused_dim or any(p.rows is None for p in pieces):
        return None
    return [p.rows for p in pieces]


def param_entries(models, dims) -> dict[str, ParamEntry]:
    """``name -> ParamEntry`` for every parameter (and buffer) of ``models`` on this rank."""
    out = {}
    dense_replica = dims.dp.rank == 0 and dims.cp.rank == 0
    for model in models:
        split = split_dims(model)
        table = model.hf.family.weight_table(model.config, model.hf.tie)
        for name, p in model.parameters_and_names():
            if name in out:
                continue
            dim, shape = split.get(name), tuple(p.shape)
            if getattr(p, "expert", False):
                plist = table.get(name)
                if not isinstance(plist, ExpertStack):
                    raise ValueError(f"expert parameter {name} is not a stacked expert tensor "
                                     "in the weight table (checkpoints need GroupedMLP experts)")
                first = dims.ep.rank * shape[0]
                spec = shard_spec(shape, dim, dims.etp.size, dims.etp.rank, _parts(plist, dim),
                                  stack=(shape[0] * dims.ep.size, first))
                unique = dim is not None or dims.etp.rank == 0
                out[name] = ParamEntry(spec, unique and dims.edp.rank == 0, unique)
                continue
            spec = shard_spec(shape, dim, dims.tp.size, dims.tp.rank, _parts(table.get(name), dim))
            unique = (dim is not None or dims.tp.rank == 0) and not (
                getattr(p, "shared_embedding", False) and not dims.is_first_stage)
            out[name] = ParamEntry(spec, unique and dense_replica, unique)
    return out


def owned_state(step_fn, dims) -> tuple[dict, dict]:
    """``(model, optimizer)``: global name -> ``Shard`` for what this rank writes."""
    entries = param_entries(chunk_models(step_fn), dims)
    model = {n: Shard(v, entries[n].spec) for n, v in step_fn.model_state().items()
             if entries[n].owner}
    optim = {}
    state = step_fn.state_dict()
    if step_fn._sharded():  # ZeRO-1 pieces: adam_{m,v}.<name> 1-D + shard.<name> descriptors
        for key, desc in state.items():
            if not key.startswith("shard."):
                continue
            name = key[len("shard."):]
            if entries[name].piece_owner:
                a, n = int(desc[0]), int(desc[1])
                for kind in ("m", "v"):
                    optim[f"adam_{kind}.{name}"] = Shard(state[f"adam_{kind}.{name}"],
                                                        entries[name].spec, (a, a + n))
    else:
        for key, value in state.items():
            name = key.split(".", 1)[1]
            if entries[name].owner:
                optim[key] = Shard(value, entries[name].spec)
    return model, optim


def requests(step_fn, dims) -> tuple[dict, dict]:
    """``(model, optimizer)``: global name -> ``ShardSpec`` of everything this rank loads."""
    entries = param_entries(chunk_models(step_fn), dims)
    model = {n: entries[n].spec for n, _ in [*step_fn.named, *step_fn.buffers]}
    optim = {f"adam_{k}.{n}": entries[n].spec for n, _ in step_fn.named for k in ("m", "v")}
    return model, optim
