"""Pre-norm encoder and decoder stacks with a shared relative position bias (T5's layout).

``EncoderLayer``: ``h = x + attn(norm(x), key_mask, bias); out = h + mlp(norm(h))`` with
bidirectional self-attention (``CoreAttention(causal=False)``): every query sees every real key
of ``key_mask [b, s]`` (1 = token, 0 = padding).
``DecoderLayer``: ``h = x + self_attn(norm(x), bias)`` (causal),
``h = h + cross_attn(norm(h), memory, memory_mask)`` (``CrossAttention``: keys and values from
the encoder output ``memory [b, t, h]``), ``out = h + mlp(norm(h))``.
Attention is ``SelfAttention`` (fused q/k/v projection) and the MLP is ``MLP``; norms are the
config's (``norm``, ``norm_eps``), softmax scale ``config.softmax_scale``.

``EncoderBlock`` / ``DecoderBlock``: ``num_layers`` layers, one ``RelativePositionBias``
(``position_bias``: bidirectional buckets in the encoder, unidirectional in the decoder) computed
once per forward and added to every layer's self-attention scores (T5 computes it in the first
layer and shares it), and a final norm (``final_norm``). Forward ``EncoderBlock(x [b, s, h],
key_mask=None) -> [b, s, h]``; ``DecoderBlock(x [b, s, h], memory [b, t, h], memory_mask=None)
-> [b, s, h]``. The decoder recomputes the whole prefix (no KV cache).

Tensor parallel over ``groups.tp`` as the blocks they hold: heads (and the position-bias
columns of those heads) and the MLP hidden size split; activations ``[b, s, h]`` replicated.
No sequence or context parallelism (``ValueError``).
"""
from __future__ import annotations

from functools import partial

from mindspore import nn

from mcore.fusions.attention import CoreAttention
from mcore.parallel_state import ModelGroups
from mcore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mcore.transformer.attention import SelfAttention, SelfAttentionSubmodules
from mcore.transformer.config import TransformerConfig
from mcore.transformer.cross_attention import CrossAttention
from mcore.transformer.layer_specs import mlp_spec
from mcore.transformer.norm import norm_class
from mcore.transformer.relative_position import RelativePositionBias
from mcore.transformer.spec import ModuleSpec, build_module


def self_attention_spec(causal: bool) -> ModuleSpec:
    """Fused-q/k/v self-attention, causal (decoder) or bidirectional (encoder)."""
    core = CoreAttention if causal else partial(CoreAttention, causal=False)
    return ModuleSpec(SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear, core_attention=core, linear_proj=RowParallelLinear))


def _norm(config: TransformerConfig):
    return norm_class(config.norm)(config.hidden_size, eps=config.norm_eps,
                                   dtype=config.params_dtype)


def _check(config: TransformerConfig, groups: ModelGroups) -> None:
    if config.parallel.sequence_parallel or groups.cp.size > 1:
        raise ValueError("encoder-decoder blocks: sequence or context parallelism is not "
                         "supported")


class _PreNormLayer(nn.Cell):
    """The parts both layers share: ``input_norm`` + ``self_attention`` (causal or not),
    ``pre_mlp_norm`` + ``mlp``."""

    def __init__(self, config: TransformerConfig, layer_number: int, groups: ModelGroups | None,
                 causal: bool):
        super().__init__()
        groups = groups or ModelGroups()
        _check(config, groups)
        self.input_norm = _norm(config)
        self.self_attention = build_module(self_attention_spec(causal), config,
                                           layer_number=layer_number, groups=groups)
        self.pre_mlp_norm = _norm(config)
        self.mlp = build_module(mlp_spec(config), config, groups=groups,
                                layer_number=layer_number)


class EncoderLayer(_PreNormLayer):
    """Bidirectional pre-norm layer; see the module docstring."""

    def __init__(self, config: TransformerConfig, layer_number: int = 0,
                 groups: ModelGroups | None = None):
        super().__init__(config, layer_number, groups, causal=False)

    def construct(self, x, key_mask=None, bias=None):
        h = x + self.self_attention(self.input_norm(x), None, None, key_mask, None, bias)
        return h + self.mlp(self.pre_mlp_norm(h))


class DecoderLayer(_PreNormLayer):
    """Causal self-attention, cross-attention, MLP (pre-norm); see the module docstring."""

    def __init__(self, config: TransformerConfig, layer_number: int = 0,
                 groups: ModelGroups | None = None):
        super().__init__(config, layer_number, groups, causal=True)
        self.pre_cross_attn_norm = _norm(config)
        self.cross_attention = CrossAttention(config, layer_number=layer_number, groups=groups)

    def construct(self, x, memory, memory_mask=None, bias=None):
        h = x + self.self_attention(self.input_norm(x), None, None, None, None, bias)
        h = h + self.cross_attention(self.pre_cross_attn_norm(h), memory, memory_mask)
        return h + self.mlp(self.pre_mlp_norm(h))


class _Block(nn.Cell):
    """The parts both stacks share: ``layers``, ``position_bias``, ``final_norm``."""

    def __init__(self, config, layer_cls, num_layers, num_buckets, max_distance, groups,
                 bidirectional):
        super().__init__()
        groups = groups or ModelGroups()
        self.layers = nn.CellList([layer_cls(config, layer_number=i, groups=groups)
                                   for i in range(num_layers)])
        self.position_bias = RelativePositionBias(
            config.num_attention_heads, num_buckets, max_distance, bidirectional, groups.tp,
            name="encoder_position_bias" if bidirectional else "decoder_position_bias",
            params_dtype=config.params_dtype)
        self.final_norm = _norm(config)


class EncoderBlock(_Block):
    """``num_layers`` ``EncoderLayer``s sharing one bidirectional position bias."""

    def __init__(self, config: TransformerConfig, num_layers: int, num_buckets: int = 32,
                 max_distance: int = 128, groups: ModelGroups | None = None):
        super().__init__(config, EncoderLayer, num_layers, num_buckets, max_distance, groups,
                         True)

    def construct(self, x, key_mask=None):
        s = x.shape[1]
        bias = self.position_bias(s, s)  # [1, n/tp, s, s]
        for layer in self.layers:
            x = layer(x, key_mask, bias)
        return self.final_norm(x)


class DecoderBlock(_Block):
    """``num_layers`` ``DecoderLayer``s sharing one causal position bias."""

    def __init__(self, config: TransformerConfig, num_layers: int, num_buckets: int = 32,
                 max_distance: int = 128, groups: ModelGroups | None = None):
        super().__init__(config, DecoderLayer, num_layers, num_buckets, max_distance, groups,
                         False)

    def construct(self, x, memory, memory_mask=None):
        s = x.shape[1]
        bias = self.position_bias(s, s)  # [1, n/tp, s, s]
        for layer in self.layers:
            x = layer(x, memory, memory_mask, bias)
        return self.final_norm(x)
