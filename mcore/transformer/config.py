"""TransformerConfig: the shape and behaviour of a decoder stack, split by concern.

``TransformerConfig`` holds the architecture fields and one sub-config per concern:

- ``RotaryConfig`` (``config.rotary``): rotary position embedding variant and scaling.
- ``AttentionConfig`` (``config.attention``): biases, QK-norm, softmax scale, core-attention chunking.
- ``MLAConfig`` (``config.mla``): multi-latent attention sizes, used when
  ``multi_latent_attention`` is set.
- ``MoEConfig`` (``config.moe``, the class of ``mcore.moe.config``): experts, routing and
  which layers are MoE (default ``num_experts=0``: dense).
- ``ParallelConfig`` (``config.parallel``): sequence parallelism (group sizes come from ParallelDims).
- ``PrecisionConfig`` (``config.precision``): parameter / compute dtypes and recompute.
- ``MTPConfig`` (``config.mtp``): multi-token prediction depths and loss factor (default off).

Every dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from mcore.moe.config import MoEConfig

ROPE_SCALING_TYPES = ("none", "linear", "llama3", "yarn")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "gelu_tanh", "relu", "silu")
NORMS = ("rmsnorm", "layernorm")
POSITION_EMBEDDINGS = ("rope", "learned", "alibi", "relative")
DTYPES = ("float32", "float16", "bfloat16")


def _require(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {why}")


@dataclass
class RotaryConfig:
    """Rotary position embedding (RoPE).

    base: theta of the frequencies ``base ** (-2i / rotary_dim)``.
    fraction: share of the head dim that is rotated (GLM: 0.5); the rest passes through.
    interleaved: pair dims (0,1),(2,3),... (GLM) instead of halves (i, i + d/2) (Llama).
    scaling: "none", "linear" (positions / factor), "llama3" (Llama-3.1 frequency bands)
        or "yarn" (YaRN: blended frequencies plus attention temperature).
    factor: context extension factor for every scaling type.
    original_max_position: pre-extension context length (llama3, yarn).
    low_freq_factor / high_freq_factor: llama3 band edges.
    beta_fast / beta_slow: yarn ramp edges, in rotations.
    mscale / mscale_all_dim: yarn attention-factor terms (DeepSeek style); 0 = unused.
    attention_factor: yarn cos/sin multiplier; None = ``0.1 * ln(factor) + 1``.
    truncate: yarn rounds the correction range to whole dims (floor / ceil).
    """

    base: float = 10000.0
    fraction: float = 1.0
    interleaved: bool = False
    scaling: str = "none"
    factor: float = 1.0
    original_max_position: int = 8192
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        _require(self.base > 0, "rotary.base", self.base, "must be > 0")
        _require(0.0 < self.fraction <= 1.0, "rotary.fraction", self.fraction, "must be in (0, 1]")
        _require(self.scaling in ROPE_SCALING_TYPES, "rotary.scaling", self.scaling,
                 f"must be one of {ROPE_SCALING_TYPES}")
        _require(self.factor >= 1.0 or self.scaling == "none", "rotary.factor", self.factor,
                 "must be >= 1")
        _require(self.original_max_position > 0, "rotary.original_max_position",
                 self.original_max_position, "must be > 0")
        _require(self.high_freq_factor > self.low_freq_factor or self.scaling != "llama3",
                 "rotary.high_freq_factor", self.high_freq_factor, "must exceed low_freq_factor")


@dataclass
class AttentionConfig:
    """Self-attention options.

    qkv_bias: bias on the fused q/k/v projection (Qwen2.5, GLM).
    out_bias: bias on the output projection.
    qk_norm: RMSNorm over head_dim on queries and keys before rotary (Qwen3).
    softmax_scale: None = ``1 / sqrt(head_dim)``.
    block_size: composed core attention processes at most this many query rows per step, so
        one score block is ``[heads, block_size, keys]`` (memory bound on long sequences).
    """

    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    softmax_scale: float | None = None
    block_size: int = 1024

    def __post_init__(self):
        _require(self.softmax_scale is None or self.softmax_scale > 0, "attention.softmax_scale",
                 self.softmax_scale, "must be > 0 or None")
        _require(self.block_size > 0, "attention.block_size", self.block_size, "must be > 0")


@dataclass
class MLAConfig:
    """Multi-latent attention (DeepSeek-V2/V3; ``mcore.transformer.mla``). Read only when
    ``TransformerConfig.multi_latent_attention`` is set, which then checks every field.

    q_lora_rank: width of the compressed query (down-projection, RMSNorm, up-projection);
        None = one direct query projection (DeepSeek-V2-Lite).
    kv_lora_rank: width of the compressed key/value latent (required).
    qk_nope_head_dim: per-head query/key dims without rotary.
    qk_rope_head_dim: per-head rotary dims (the key's rotary part is shared by all heads; even).
    v_head_dim: per-head value width.
    latent_norm_eps: epsilon of the two latent RMSNorms (DeepSeek uses 1e-6 there).
    """

    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    latent_norm_eps: float = 1e-6

    def check(self) -> None:
        """Raise naming the field if these sizes cannot build an MLA layer."""
        _require(self.kv_lora_rank is not None, "mla.kv_lora_rank", self.kv_lora_rank,
                 "is required with multi_latent_attention")
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim"):
            value = getattr(self, name)
            if name == "q_lora_rank" and value is None:
                continue
            _require(isinstance(value, int) and value > 0, f"mla.{name}", value,
                     "must be a positive int")
        _require(self.qk_rope_head_dim % 2 == 0, "mla.qk_rope_head_dim", self.qk_rope_head_dim,
                 "must be even (rotary turns pairs of dims)")
        _require(self.latent_norm_eps > 0, "mla.latent_norm_eps", self.latent_norm_eps,
                 "must be > 0")

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class ParallelConfig:
    """Parallel behaviour that is not a group size (sizes come from ``ParallelDims``).

    sequence_parallel: activations outside attention/MLP are split along the sequence over tp.
    context_parallel_comm: how self-attention exchanges keys and values when the layers' cp
        group has more than one rank (``ModelGroups.cp``; ignored otherwise): ``"a2a"``
        (all-to-all to a head split, Ulysses) or ``"ring"`` (key/value blocks passed around
        the ring); ``mcore.transformer.context_parallel``.
    """

    sequence_parallel: bool = False
    context_parallel_comm: str = "a2a"

    def __post_init__(self):
        if self.context_parallel_comm not in ("a2a", "ring"):
            raise ValueError(f"parallel.context_parallel_comm={self.context_parallel_comm!r}: "
                             "expected 'a2a' or 'ring'")


@dataclass
class PrecisionConfig:
    """Dtypes and activation recompute.

    params_dtype: dtype in which attention, MLP, experts, norms, embedding and head create
        their parameters (the router weight stays float32). compute_dtype: dtype of matmuls and activations.
    recompute_layers: indices of layers whose activations are recomputed in backward
        (``"all"`` for every layer).
    """

    params_dtype: str = "float32"
    compute_dtype: str = "float32"
    recompute_layers: tuple | str = ()

    def __post_init__(self):
        for name in ("params_dtype", "compute_dtype"):
            value = getattr(self, name)
            _require(value in DTYPES, f"precision.{name}", value, f"must be one of {DTYPES}")
        _require(self.recompute_layers == "all" or isinstance(self.recompute_layers, (tuple, list)),
                 "precision.recompute_layers", self.recompute_layers, "must be 'all' or indices")


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3; ``mcore.transformer.mtp``), off by default.

    num_layers: prediction depths D (Hugging Face ``num_nextn_predict_layers``); depth k
        predicts the token k + 1 positions ahead with one extra transformer layer.
    loss_factor: lambda: the training loss is ``lm_loss + loss_factor * mean_k mtp_loss_k``.
    """

    num_layers: int = 0
    loss_factor: float = 0.1

    def __post_init__(self):
        _require(isinstance(self.num_layers, int) and self.num_layers >= 0, "mtp.num_layers",
                 self.num_layers, "must be an int >= 0")
        _require(self.loss_factor >= 0, "mtp.loss_factor", self.loss_factor, "must be >= 0")


@dataclass
class TransformerConfig:
    """Architecture of a decoder stack.

    num_layers, hidden_size: depth and model width h.
    num_attention_heads: query heads n. num_query_groups: key/value heads (GQA; None = n, MHA;
        1 = MQA). head_dim: per-head width d (None = h / n; Qwen3 sets it independently).
    ffn_hidden_size: MLP inner width. activation: "swiglu" (gated SiLU), "geglu" (gated tanh-GELU,
        T5 v1.1's "gated-gelu") or an ungated one.
    norm: "rmsnorm" or "layernorm"; norm_eps: its epsilon.
    sandwich_norm: extra norms on the attention and MLP outputs before the residual add (GLM-4-0414).
    mlp_fc1_bias / mlp_fc2_bias: biases on the MLP input (gate/up) / output (down) projections.
    position_embedding: how positions enter: "rope" (rotary, ``rotary``), "learned" (a table of
        ``max_position_embeddings`` absolute positions added to the token embedding; GPT-2) or
        "alibi" (per-head linear attention biases, ``mcore.transformer.positions``; Bloom) or
        "relative" (T5's bucketed relative position bias, added by the encoder-decoder blocks of
        ``mcore.transformer.encoder_decoder``).
        ``rotary`` is unused unless "rope".
    max_position_embeddings: rows of the learned position table (required with "learned").
    embedding_norm: a LayerNorm-type norm (``norm``) on the token embedding (Bloom).
    norm_head: the output head normalises each vocabulary row of its weight to unit L2 norm
        before the product (``mcore.tensor_parallel.layers.NormHead``; Baichuan2); needs an
        untied head.
    multi_latent_attention: the attention of every layer is MLA (``config.mla``;
        ``gpt_layer_spec`` selects it). head_dim is then ``mla.qk_head_dim``, the rotary dims
        are ``mla.qk_rope_head_dim`` (``rotary.fraction`` unused) and the default softmax scale
        is ``qk_head_dim ** -0.5`` times ``m ** 2`` with ``m = 0.1 mscale_all_dim ln(factor) + 1``
        when ``rotary.scaling == "yarn"`` with ``mscale_all_dim`` (DeepSeek).
    moe: ``mcore.moe.config.MoEConfig``; layers it marks (``is_moe_layer``) get a ``MoELayer``
        as their mlp (``gpt_layer_specs``).
    mtp: ``MTPConfig``: multi-token prediction depths on top of the last layer (``GPTModel``).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_query_groups: int | None = None
    head_dim: int | None = None
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    sandwich_norm: bool = False
    mlp_fc1_bias: bool = False
    mlp_fc2_bias: bool = False
    position_embedding: str = "rope"
    max_position_embeddings: int | None = None
    embedding_norm: bool = False
    norm_head: bool = False
    rotary: RotaryConfig = field(default_factory=RotaryConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    multi_latent_attention: bool = False
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "must be a positive int")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        _require(0 < self.num_query_groups <= self.num_attention_heads
                 and self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
                 self.num_query_groups, f"must divide num_attention_heads={self.num_attention_heads}")
        if self.multi_latent_attention:
            self.mla.check()
            _require(self.head_dim in (None, self.mla.qk_head_dim), "head_dim", self.head_dim,
                     f"must be None or mla.qk_head_dim={self.mla.qk_head_dim} with "
                     f"multi_latent_attention")
            self.head_dim = self.mla.qk_head_dim
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                     self.hidden_size, f"must be divisible by num_attention_heads="
                     f"{self.num_attention_heads} (or set head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _require(self.head_dim > 0, "head_dim", self.head_dim, "must be > 0")
        _require(self.activation in ACTIVATIONS, "activation", self.activation,
                 f"must be one of {ACTIVATIONS}")
        _require(self.norm in NORMS, "norm", self.norm, f"must be one of {NORMS}")
        _require(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")
        _require(self.position_embedding in POSITION_EMBEDDINGS, "position_embedding",
                 self.position_embedding, f"must be one of {POSITION_EMBEDDINGS}")
        _require(self.position_embedding != "learned" or (
            isinstance(self.max_position_embeddings, int) and self.max_position_embeddings > 0),
            "max_position_embeddings", self.max_position_embeddings,
            "must be a positive int with position_embedding='learned'")
        rot = self.head_dim * self.rotary.fraction
        _require(self.multi_latent_attention or self.position_embedding != "rope" or (
            abs(rot - round(rot)) < 1e-6 and round(rot) % 2 == 0 and rot > 0),
                 "rotary.fraction", self.rotary.fraction,
                 f"head_dim * fraction = {rot} must be a positive even integer")
        if self.moe.num_experts:
            _require(self.moe.ffn_hidden_size > 0, "moe.ffn_hidden_size", self.moe.ffn_hidden_size,
                     "must be > 0 when num_experts > 0")
            _require(self.activation != "geglu", "activation", self.activation,
                     "is not implemented for MoE experts (moe.num_experts > 0)")
            self.moe.check_layers(self.num_layers)

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether global layer ``layer_number`` has a MoE mlp (``moe.is_moe_layer``)."""
        return self.moe.is_moe_layer(layer_number)

    @property
    def params_dtype(self):
        """``precision.params_dtype`` as a MindSpore dtype: every layer built from this config
        creates its parameters in it."""
        import mindspore as ms

        return getattr(ms, self.precision.params_dtype)

    @property
    def rotary_dim(self) -> int:
        """Number of rotated dims per head (``head_dim * rotary.fraction``, rounded down to an
        even number, as the rotary tables of a non-"rope" config are built but unused;
        ``mla.qk_rope_head_dim`` with multi-latent attention)."""
        if self.multi_latent_attention:
            return self.mla.qk_rope_head_dim
        return int(round(self.head_dim * self.rotary.fraction)) // 2 * 2 or 2

    def local_kv_heads(self, tp: int) -> int:
        """Key/value heads one tp rank holds: ``num_query_groups / tp``, or the single head of
        multi-query attention (``num_query_groups == 1``), which every rank replicates."""
        return 1 if self.num_query_groups == 1 else self.num_query_groups // tp

    @property
    def softmax_scale(self) -> float:
        """``attention.softmax_scale``, or by default ``head_dim ** -0.5`` (with multi-latent
        attention times DeepSeek's YaRN correction ``mscale(factor, mscale_all_dim) ** 2``)."""
        s = self.attention.softmax_scale
        if s is not None:
            return s
        scale = 1.0 / math.sqrt(self.head_dim)
        rot = self.rotary
        if self.multi_latent_attention and rot.scaling == "yarn" and rot.mscale_all_dim:
            m = 1.0 if rot.factor <= 1 else 0.1 * rot.mscale_all_dim * math.log(rot.factor) + 1.0
            scale = scale * m * m
        return scale

    def check_tp(self, tp: int) -> None:
        """Raise naming the field if this architecture cannot be split over ``tp`` ranks."""
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(self, name)
            _require(value % tp == 0, name, value, f"must be divisible by tensor parallel size {tp}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
