"""The run's ``Config`` -> a ``TransformerConfig`` and a ``GPTModel``, without a detour through a
Hugging Face dict.

    tcfg = transformer_config(cfg)                          # ConfigError naming the YAML key
    model = build_gpt(cfg, tp_group=dims.tp)                # a fresh GPTModel (or one stage)

``transformer_config`` reads every architecture field of the ``model`` section, the family's
fixed choices (``FAMILIES``: Qwen2.5's qkv bias, Qwen3's qk-norm, GLM-4's interleaved
half-rotary and sandwich norms, Llama 3.1's rotary bands, TeleChat2's output biases), the
knobs (``model.head_dim``, ``model.attention_block_size``, ``model.recompute_layers``), the
compute dtype (``training.dtype`` -> ``precision.compute_dtype``; parameters stay fp32) and
``parallel.sp`` (``parallel.sequence_parallel``, only when ``parallel.tp`` > 1). With ``model.hf_path`` the architecture comes
from that directory's ``config.json`` (a Hugging Face directory is what the HF dict is for) and
the knobs, dtype and sp still come from the YAML.

``hf_config(model_section)`` is the other direction, used only to write a Hugging Face
directory (``model.save_pretrained``) of a model trained from YAML: its ``config.json`` maps
back, through the family file, to the same ``TransformerConfig`` (tests/training/
test_model_bridge.py checks it for every family config in ``configs/``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from training.config_validate import ConfigError

__all__ = ["Family", "FAMILIES", "MODEL_TYPES", "LLAMA3_ROPE_SCALING", "transformer_config",
           "hf_dir_config", "build_gpt", "hf_config", "moe_config"]


@dataclass(frozen=True)
class Family:
    """What a ``model.family`` fixes beyond the YAML sizes. ``model_type``: the family file in
    ``models/`` that names its weights (``models.hf.FAMILIES``)."""

    model_type: str
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    rotary_fraction: float = 1.0
    rotary_interleaved: bool = False
    llama3_rope: bool = False
    sandwich_norm: bool = False
    mlp_fc2_bias: bool = False
    head_dim_key: bool = True  # its config.json can carry an explicit head_dim


FAMILIES = {
    "llama": Family("llama"),
    "llama3_1": Family("llama", llama3_rope=True),
    "qwen2_5": Family("qwen2", qkv_bias=True),
    "qwen3": Family("qwen3", qk_norm=True),
    "glm4": Family("glm4", qkv_bias=True, rotary_fraction=0.5, rotary_interleaved=True,
                   sandwich_norm=True),
    "telechat2": Family("telechat", out_bias=True, mlp_fc2_bias=True, head_dim_key=False),
    "deepseek_v3": Family("deepseek_v3", rotary_interleaved=True, head_dim_key=False),
}
MODEL_TYPES = {name: fam.model_type for name, fam in FAMILIES.items()}

# Llama 3.1's rotary frequency bands (as in its published config.json).
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# TransformerConfig field -> the YAML key that sets it (for error messages).
_KEYS = {"num_layers": "model.num_layers", "hidden_size": "model.hidden_size",
         "num_attention_heads": "model.num_heads", "num_query_groups": "model.num_kv_heads",
         "ffn_hidden_size": "model.ffn_hidden_size", "head_dim": "model.head_dim",
         "norm_eps": "model.norm_eps", "rotary.base": "model.rope_theta",
         "attention.block_size": "model.attention_block_size",
         "precision.recompute_layers": "model.recompute_layers",
         "precision.compute_dtype": "training.dtype"}


def _family(cfg) -> Family:
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"model.family={cfg.model.family!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.model.family]


def _knobs(cfg) -> dict:
    """The TransformerConfig parts the YAML sets for every family (and for ``hf_path``)."""
    from mcore.transformer.config import MTPConfig, ParallelConfig, PrecisionConfig

    m = cfg.model
    recompute = m.recompute_layers if m.recompute_layers is not None else ()
    precision = PrecisionConfig(params_dtype="float32",
                                compute_dtype=_DTYPES.get(cfg.training.dtype, cfg.training.dtype),
                                recompute_layers=recompute if recompute == "all" else tuple(recompute))
    # As in Megatron, sequence parallelism is off when tp = 1 (pretrain.py logs a warning).
    sp = bool(cfg.parallel.sp) and cfg.parallel.tp > 1
    mtp = MTPConfig(num_layers=m.mtp.num_layers, loss_factor=m.mtp.loss_factor)
    parallel = ParallelConfig(sequence_parallel=sp, context_parallel_comm=cfg.parallel.cp_comm)
    return {"precision": precision, "parallel": parallel, "mtp": mtp}


def _rotary_check(cfg, fam: Family) -> None:
    """An odd rotary width fails deep inside the build; say which YAML keys make it."""
    m = cfg.model
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    rot = head_dim * fam.rotary_fraction
    if rot != int(rot) or int(rot) % 2 or rot <= 0:
        source = (f"model.head_dim={m.head_dim}" if m.head_dim else
                  f"model.hidden_size={m.hidden_size} / model.num_heads={m.num_heads}")
        raise ConfigError(f"{source} gives head_dim {head_dim}, whose rotary part ({head_dim} * "
                          f"{fam.rotary_fraction} for model.family={m.family}) must be a positive "
                          "even number of dims")


def config_error(exc: ValueError) -> ConfigError:
    """A TransformerConfig ``ValueError`` ("field=value: why") as a ConfigError naming YAML keys."""
    text = str(exc)
    field, _, rest = text.partition("=")
    if field in _KEYS:
        return ConfigError(f"{_KEYS[field]}={rest}")
    return ConfigError(f"model section: {text}")


def transformer_config(cfg):
    """``TransformerConfig`` of a validated run ``Config`` (see the module docstring); every
    rejection is a ``ConfigError`` naming the YAML key. Imports MindSpore (``mcore.transformer``)."""
    from mcore.transformer.config import AttentionConfig, RotaryConfig, TransformerConfig

    if cfg.model.hf_path:
        return hf_dir_config(cfg)[0]
    m, fam = cfg.model, _family(cfg)
    if m.family == "deepseek_v3":
        return _deepseek_config(cfg)
    if m.mla.kv_lora_rank is not None:
        raise ConfigError(f"model.mla.kv_lora_rank={m.mla.kv_lora_rank}: multi-latent attention "
                          f"needs model.family=deepseek_v3 (have {m.family})")
    if m.head_dim is not None and not fam.head_dim_key:
        raise ConfigError(f"model.head_dim={m.head_dim}: model.family={m.family} has no separate "
                          "head width (set it to null)")
    _rotary_check(cfg, fam)
    if fam.llama3_rope:
        s = LLAMA3_ROPE_SCALING
        rotary = dict(scaling="llama3", factor=s["factor"], low_freq_factor=s["low_freq_factor"],
                      high_freq_factor=s["high_freq_factor"],
                      original_max_position=s["original_max_position_embeddings"])
    else:
        rotary = dict(original_max_position=m.max_position_embeddings)
    moe = _moe_kwargs(cfg)  # its own ConfigError names model.moe.<key>
    try:
        return TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_heads,
            ffn_hidden_size=m.ffn_hidden_size, num_query_groups=m.num_kv_heads,
            head_dim=m.head_dim, activation="swiglu", norm="rmsnorm", norm_eps=m.norm_eps,
            sandwich_norm=fam.sandwich_norm, mlp_fc2_bias=fam.mlp_fc2_bias,
            rotary=RotaryConfig(base=m.rope_theta, fraction=fam.rotary_fraction,
                                interleaved=fam.rotary_interleaved, **rotary),
            attention=AttentionConfig(qkv_bias=fam.qkv_bias, out_bias=fam.out_bias,
                                      qk_norm=fam.qk_norm, block_size=m.attention_block_size),
            **moe, **_knobs(cfg))
    except ValueError as exc:
        raise config_error(exc) from None


def _deepseek_config(cfg):
    """``model.family: deepseek_v3``: MLA sizes from ``model.mla``, the dense sizes, rotary
    base and norm from ``model``, routing from ``model.moe`` (``moe_config``), through the
    family file (``models.deepseek_v3.config_from_hf``) so that both routes build one model."""
    from models.deepseek_v3 import config_from_hf

    m = cfg.model
    if m.mla.kv_lora_rank is None:
        raise ConfigError("model.mla.kv_lora_rank=None: model.family=deepseek_v3 needs the "
                          "latent width")
    moe = _moe_kwargs(cfg)
    hf = {k: v for k, v in hf_config(m).items() if k not in _DEEPSEEK_ROUTING}
    try:
        base = config_from_hf(hf)
        attention = dataclasses.replace(base.attention, block_size=m.attention_block_size)
        return dataclasses.replace(base, attention=attention, **moe, **_knobs(cfg))
    except ValueError as exc:
        text = str(exc)
        raise (ConfigError(f"model.{text}") if text.startswith("mla.")
               else config_error(exc)) from None


# model.moe as DeepSeek config.json keys (written by hf_config for a saved directory).
_DEEPSEEK_ROUTING = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
                     "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor")


def _deepseek_hf(model) -> dict:
    """The MLA and routing keys of a ``deepseek_v3`` ``config.json``."""
    a, moe = model.mla, model.moe
    out = {"q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
           "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
           "v_head_dim": a.v_head_dim, "rope_interleave": True,
           # the MTP depths are written as layers num_layers + d; from_pretrained skips them
           "num_nextn_predict_layers": model.mtp.num_layers}
    if moe.num_experts:
        ffn = moe.ffn_hidden_size or model.ffn_hidden_size
        out.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                   moe_intermediate_size=ffn, n_shared_experts=moe.shared_ffn_hidden_size // ffn,
                   first_k_dense_replace=moe.first_k_dense, n_group=moe.num_groups or 1,
                   topk_group=moe.group_topk or 1, topk_method=moe.topk_method or "greedy",
                   scoring_func=moe.score_function, norm_topk_prob=moe.normalize_topk,
                   routed_scaling_factor=moe.routed_scaling_factor)
    return out


def hf_dir_config(cfg):
    """``(TransformerConfig, family module, config.json dict)`` of ``model.hf_path``, with the
    YAML's knobs, dtype and sp applied."""
    from models.hf import family_of

    path = Path(cfg.model.hf_path) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8 / JSON, NUL in name
        raise ConfigError(f"model.hf_path: cannot read '{path}': "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"model.hf_path: '{path}' does not hold a JSON object")
    try:
        family = family_of(hf)
        base = family.config_from_hf(hf)
        attention = dataclasses.replace(base.attention, block_size=cfg.model.attention_block_size)
        tcfg = dataclasses.replace(base, attention=attention, **_knobs(cfg))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a config.json we cannot map
        raise ConfigError(f"model.hf_path: '{path}': {type(exc).__name__} {exc}") from None
    return tcfg, family, hf


def model_vocab(cfg) -> int:
    """The model's vocabulary (embedding rows): ``model.hf_path``'s config.json through
    ``models.hf.vocab_size_of`` (a family's own key, e.g. ChatGLM's ``padded_vocab_size``), else
    ``model.vocab_size``. ``ConfigError`` if the directory's config names no vocabulary."""
    if not cfg.model.hf_path:
        return cfg.model.vocab_size
    from models.hf import vocab_size_of

    _, family, hf = hf_dir_config(cfg)
    try:
        vocab = vocab_size_of(hf, family)
    except KeyError as exc:
        raise ConfigError(f"model.hf_path: its config.json has no vocabulary size "
                          f"({exc})") from None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise ConfigError(f"model.hf_path: the vocabulary size {vocab!r} of its config.json is "
                          "not a positive integer")
    return vocab


def vocab_key(cfg) -> str:
    """Where ``model_vocab(cfg)`` comes from, for error messages."""
    return "model.hf_path's vocabulary" if cfg.model.hf_path else "model.vocab_size"


def build_gpt(cfg, tp_group=None, stage=None, embedding_group=None, groups=None):
    """A randomly initialised ``GPTModel`` (or pipeline ``stage``, a ``models.StageSpec``) of
    ``transformer_config(cfg)`` over ``groups`` (a ``ModelGroups``; or the older ``tp_group``),
    tagged with its Hugging Face identity (``model.hf``) so that
    ``save_pretrained`` and the family's weight table work. Weights of ``model.hf_path`` are
    not read here (``models.hf.load_weights``)."""
    from models.gpt import GPTModel, StageSpec
    from models.hf import FAMILIES as FAMILY_FILES, HFInfo, vocab_size_of

    if cfg.model.hf_path:
        tcfg, family, hf = hf_dir_config(cfg)
        vocab = vocab_size_of(hf, family)
        tie = bool(hf.get("tie_word_embeddings", family.TIE_DEFAULT))
    else:
        tcfg, hf = transformer_config(cfg), hf_config(cfg.model)
        family, vocab, tie = FAMILY_FILES[hf["model_type"]], cfg.model.vocab_size, \
            cfg.model.tie_word_embeddings
    stage = stage or StageSpec.full(tcfg.num_layers)
    spec = family.layer_spec(tcfg)
    moe_mlp = None
    if tcfg.moe.num_experts and not cfg.model.hf_path:  # the YAML's dispatcher
        from mcore.transformer.layer_specs import gpt_layer_spec, moe_layer_specs, moe_mlp_spec

        moe_mlp = moe_mlp_spec(dispatcher=DISPATCHERS[cfg.model.moe.dispatcher])
        base = gpt_layer_spec(tcfg) if isinstance(spec, (list, tuple)) else spec  # deepseek_v3
        spec = moe_layer_specs(tcfg, base, moe_mlp)
    mtp_spec = None  # a family's own MTP layer (deepseek_v3: MoE like its checkpoints' layer)
    if tcfg.mtp.num_layers and hasattr(family, "mtp_layer_spec"):
        mtp_spec = family.mtp_layer_spec(tcfg, moe_mlp)
    model = GPTModel(tcfg, spec, vocab, tie_embeddings=tie, groups=groups,
                     tp_group=tp_group, pre_process=stage.pre_process,
                     post_process=stage.post_process, layer_range=stage.layer_range,
                     embedding_group=embedding_group, mtp_layer_spec=mtp_spec)
    model.hf = HFInfo(family, dict(hf), tie)
    return model


def hf_config(model) -> dict:
    """Hugging Face ``config.json`` contents for a ``ModelConfig`` (for writing a HF directory)."""
    family = model.family
    if family not in MODEL_TYPES:
        raise ValueError(f"model.family={family!r} has no Hugging Face mapping "
                         f"(known: {sorted(MODEL_TYPES)})")
    common = {"model_type": MODEL_TYPES[family], "vocab_size": model.vocab_size,
              "hidden_size": model.hidden_size, "num_key_value_heads": model.num_kv_heads,
              "max_position_embeddings": model.max_position_embeddings, "rope_theta": model.rope_theta,
              "tie_word_embeddings": model.tie_word_embeddings, "hidden_act": "silu"}
    if family == "telechat2":  # TeleChat's own key names
        return {**common, "n_layer": model.num_layers, "n_head": model.num_heads,
                "ffn_hidden_size": model.ffn_hidden_size, "layer_norm_epsilon": model.norm_eps}
    out = {**common, "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
           "intermediate_size": model.ffn_hidden_size, "rms_norm_eps": model.norm_eps}
    if getattr(model, "head_dim", None) is not None:
        out["head_dim"] = model.head_dim
    if family == "llama3_1":
        out["rope_scaling"] = dict(LLAMA3_ROPE_SCALING)
    if family == "glm4":
        out["partial_rotary_factor"] = 0.5
        out["attention_bias"] = True
    if family == "deepseek_v3":
        out.update(_deepseek_hf(model))
    return out


DISPATCHERS = {"alltoall": "AllToAllDispatcher", "allgather": "AllGatherDispatcher"}


def _moe_kwargs(cfg) -> dict:
    moe = moe_config(cfg)
    return {} if moe is None else {"moe": moe}


def moe_config(cfg):
    """``model.moe`` -> ``mcore.moe.config.MoEConfig`` (``TransformerConfig.moe``), or ``None``
    for a dense model (``num_experts: 0``). The expert width defaults to
    ``model.ffn_hidden_size``. A value the MoEConfig rejects is a ``ConfigError`` naming
    ``model.moe.<key>``. (``dispatcher`` is a layer choice, ``DISPATCHERS``, read by
    ``build_gpt``.)"""
    from mcore.moe.config import MoEConfig

    s = cfg.model.moe
    if s.num_experts == 0:
        return None
    routing = {}
    if s.topk_method is not None:
        from mcore.moe.hf_routing import GROUP_SCORE_OF

        routing = dict(pre_softmax=True, group_score=GROUP_SCORE_OF.get(s.topk_method, "max"))
    try:
        return MoEConfig(**routing, scaling_factor=s.routed_scaling_factor,
                         num_experts=s.num_experts, top_k=s.top_k,
                         ffn_hidden_size=s.ffn_hidden_size or cfg.model.ffn_hidden_size,
                         shared_ffn_hidden_size=s.shared_ffn_hidden_size,
                         score_function=s.score_function, normalize_topk=s.normalize_topk,
                         num_groups=s.num_groups, group_topk=s.group_topk,
                         aux_loss_coeff=s.aux_loss_coeff, z_loss_coeff=s.z_loss_coeff,
                         capacity_factor=s.capacity_factor, first_k_dense=s.first_k_dense,
                         expert_bias=s.expert_bias, bias_update_rate=s.bias_update_rate)
    except ValueError as exc:  # "moe.<field>=<value>: why"
        text = " ".join(str(exc).split())
        for field, key in (("moe.scaling_factor=", "moe.routed_scaling_factor="),
                           ("moe.group_score=", "moe.topk_method=")):
            text = text.replace(field, key, 1) if text.startswith(field) else text
        raise ConfigError(f"model.{text}") from None
