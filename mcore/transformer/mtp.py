"""Multi-token prediction (MTP, DeepSeek-V3): extra depths that each predict one token further.

With ``D = config.mtp.num_layers`` depths on top of a GPT model whose last hidden state (after
its final norm: what the output head reads) is ``h^0 [b, s, h]``, depth ``k = 1 .. D`` computes,
at every position ``t``::

    x^k_t = eh_proj_k([enorm_k(Emb(token_{t+k})) ; hnorm_k(h^{k-1}_t)])     [2h] -> [h]
    h^k   = final_norm_k(TransformerLayer_k(x^k))
    loss_k = mean_t CE(Head(h^k_t), token_{t+k+1})

``Emb`` and ``Head`` are the main model's token embedding (without the learned positions or
embedding norm some legacy families add) and output head (shared weights); the norms,
the projection (no bias) and the layer belong to the depth. The concatenation puts the
embedding first, as DeepSeek's released MTP weights expect (``eh_proj [h, 2h]``), and a depth's
normalised output feeds the next depth (Megatron's chaining; DeepSeek-V3 has D = 1). Positions
whose token ``t + k`` or label lies past the end of the sequence have no target: the inputs
there are filled (``shift_left``) and the label is -100, so ``loss_k`` averages over the
``s - k`` positions per sequence that have one (and skips -100 labels of the data). The layer is
causal, so no position sees a later token than its own input.

``GPTModel`` builds ``MultiTokenPrediction`` and adds ``loss_factor * mean_k loss_k`` to its
training loss (``GPTModel.loss_terms``). Tensor parallel: the embedding output and the hidden
state are replicated over tp, the layer is tensor parallel like the decoder's, and ``eh_proj``
is replicated (seeded from its name: identical on every rank, its gradient identical too).
A depth's layer may be a MoE layer (DeepSeek-V3's released MTP layer is): its router losses
(weighted by ``config.moe``'s coefficients, like the decoder's) and expert counts come back
through ``MTPLayer.forward_with_aux``, and ``GPTModel.loss_terms`` appends them as rows
``num_layers + d`` of its ``aux`` / ``counts`` (``MultiTokenPrediction.moe_layers``).
Parameter names: ``mtp.layers.<d>.{enorm, hnorm}.weight``, ``mtp.layers.<d>.eh_proj.weight``,
``mtp.layers.<d>.layer.*`` (a ``TransformerLayer`` with ``layer_number = num_layers + d``, as
Hugging Face checkpoints number it), ``mtp.layers.<d>.final_norm.weight``; ``d = k - 1``.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops

from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.random import init_master, name_seed
from mcore.transformer.config import TransformerConfig
from mcore.transformer.norm import norm_class
from mcore.transformer.spec import build_module


def shift_left(x, k: int, fill):
    """``[b, s] -> [b, s]``: position ``t`` holds ``x[:, t + k]``; the last ``k`` hold ``fill``."""
    b, s = x.shape
    if not 0 < k < s:
        raise ValueError(f"shift_left: k={k} must be in [1, sequence length {s})")
    pad = ops.fill(x.dtype, (b, k), fill)
    return ops.concat((x[:, k:], pad), 1)  # [b, s-k] + [b, k] -> [b, s]


class ReplicatedLinear(nn.Cell):
    """``y = x W^T`` with ``W [out, in]`` identical on every rank (seeded from ``name``)."""

    def __init__(self, in_size: int, out_size: int, name: str, dtype=ms.float32):
        super().__init__()
        w = init_master((out_size, in_size), name_seed(f"{name}.weight"))
        self.weight = Parameter(ms.Tensor(w).astype(dtype), name="weight")

    def construct(self, x):
        return ops.matmul(x, self.weight.transpose(1, 0))  # [..., in] -> [..., out]


class MTPLayer(nn.Cell):
    """One prediction depth: ``(hidden [b, s, h], embedded [b, s, h], cos, sin, key_mask) ->
    [b, s, h]`` (normalised; see the module docstring). ``depth``: 0-based."""

    def __init__(self, config: TransformerConfig, layer_spec, depth: int,
                 groups: ModelGroups | None = None):
        super().__init__()
        h, eps, dtype = config.hidden_size, config.norm_eps, config.params_dtype
        norm = norm_class(config.norm)
        number = config.num_layers + depth
        self.enorm = build_module(norm, h, eps=eps, dtype=dtype)
        self.hnorm = build_module(norm, h, eps=eps, dtype=dtype)
        self.eh_proj = ReplicatedLinear(2 * h, h, f"mtp.layers.{depth}.eh_proj", dtype)
        self.layer = build_module(layer_spec, config, layer_number=number, groups=groups)
        self.is_moe = bool(getattr(self.layer, "is_moe", False))  # dense or MoE: the spec's
        self.final_norm = build_module(norm, h, eps=eps, dtype=dtype)

    def _input(self, hidden, embedded):
        x = ops.concat((self.enorm(embedded), self.hnorm(hidden)), -1)  # [b, s, 2h]
        return self.eh_proj(x)  # [b, s, 2h] -> [b, s, h]

    def construct(self, hidden, embedded, cos, sin, key_mask=None):
        """``-> [b, s, h]`` (a MoE layer's router losses are dropped here)."""
        return self.final_norm(self.layer(self._input(hidden, embedded), cos, sin, key_mask, None))

    def forward_with_aux(self, hidden, embedded, cos, sin, key_mask=None):
        """MoE depths only: ``-> (out [b, s, h], aux [3], counts [E])`` (the layer's
        ``forward_with_aux``)."""
        x, aux, counts = self.layer.forward_with_aux(self._input(hidden, embedded), cos, sin,
                                                     key_mask, None)
        return self.final_norm(x), aux, counts


class MultiTokenPrediction(nn.Cell):
    """``config.mtp.num_layers`` ``MTPLayer``s in ``self.layers`` (see the module docstring);
    ``moe_layers``: the layer numbers ``num_layers + d`` of the MoE depths."""

    def __init__(self, config: TransformerConfig, layer_spec, groups: ModelGroups | None = None):
        super().__init__()
        self.loss_factor = float(config.mtp.loss_factor)
        self.layers = nn.CellList([MTPLayer(config, layer_spec, d, groups)
                                   for d in range(config.mtp.num_layers)])
        self.moe_layers = tuple(config.num_layers + d for d, layer in enumerate(self.layers)
                                if layer.is_moe)
