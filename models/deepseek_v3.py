"""DeepSeek-V3 (HF ``model_type`` "deepseek_v3"): config mapping, layer spec, weight names.

Architecture: RMSNorm decoder layers with multi-latent attention (``mcore.transformer.mla``,
docs/mla.md; interleaved YaRN rotary with DeepSeek's mscale) and, from layer
``first_k_dense_replace`` on, a mixture of SwiGLU experts with ``n_shared_experts`` shared
experts (one ungated MLP of ``n_shared_experts * moe_intermediate_size``). Routing is read by
``mcore.moe.hf_routing.moe_config_from_hf``; a config without ``topk_method`` /
``scoring_func`` (transformers' ``DeepseekV3Config`` does not write them) routes like DeepSeek-V3:
``noaux_tc`` with sigmoid scores.

Weights (``model.layers.N.``): ``self_attn.q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or
``q_proj`` when ``q_lora_rank`` is null), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
``kv_b_proj``, ``o_proj``; dense ``mlp.{gate,up,down}_proj``; MoE ``mlp.gate.weight`` (router),
``mlp.gate.e_score_correction_bias`` (the router's ``expert_bias``, V3 only),
``mlp.experts.E.{gate,up,down}_proj``, ``mlp.shared_experts.{gate,up,down}_proj``.

Multi-token prediction: released V3 checkpoints store ``num_nextn_predict_layers`` MTP layers as
layers ``num_hidden_layers + d``. They are ignored (also by strict loading) unless the config
(or an override) sets ``use_mtp=True``; then ``TransformerConfig.mtp`` gets
``num_nextn_predict_layers`` depths whose ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` and decoder-layer tensors are loaded (``embed_tokens`` and
``shared_head.head`` of an MTP layer repeat the main model's and are ignored). Every depth's layer
is a MoE layer when layer ``num_hidden_layers`` is one by the routing keys (every released V3:
the index is past ``first_k_dense_replace``), else dense (``mtp_layer_spec``); a MoE depth's
router losses and expert counts join the decoder's (``models.gpt``, "Multi-token prediction").
Rejected: ``attention_bias=true``.
"""
from __future__ import annotations

import dataclasses

from mcore.moe.hf_routing import moe_config_from_hf
from mcore.transformer.config import MLAConfig, MTPConfig, TransformerConfig
from mcore.transformer.layer_specs import gpt_layer_spec, gpt_layer_specs, moe_mlp_spec
from models.common import activation_from_hf, expert_entries, rope_from_hf
from models.weights import NOT_STORED, Piece, pieces

MODEL_TYPES = ("deepseek_v3",)
TIE_DEFAULT = False
ROUTING_DEFAULTS = {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}
STORES_CORRECTION_BIAS = True


def mla_from_hf(hf: dict) -> MLAConfig:
    return MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                     qk_nope_head_dim=hf["qk_nope_head_dim"],
                     qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])


def mtp_from_hf(hf: dict) -> MTPConfig:
    """``MTPConfig`` of ``use_mtp`` (off unless true) and ``num_nextn_predict_layers``."""
    if not hf.get("use_mtp", False):
        return MTPConfig()
    depth = hf.get("num_nextn_predict_layers", 0)
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"use_mtp=True: the checkpoint has no MTP layers "
                         f"(num_nextn_predict_layers={depth!r})")
    return MTPConfig(num_layers=depth)


def config_from_hf(hf: dict, routing_defaults: dict | None = None,
                   interleaved_default: bool = True) -> TransformerConfig:
    """``TransformerConfig`` of a DeepSeek config; ``routing_defaults``: HF routing keys a
    config may omit (V3: ``ROUTING_DEFAULTS``)."""
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=true: biases in DeepSeek attention are not supported")
    routing = {**(ROUTING_DEFAULTS if routing_defaults is None else routing_defaults), **hf}
    moe = moe_config_from_hf(routing) if hf.get("n_routed_experts") else None
    interleaved = bool(hf.get("rope_interleave", interleaved_default))
    cfg = TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        activation=activation_from_hf(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rotary=rope_from_hf(hf, interleaved=interleaved), multi_latent_attention=True,
        mla=mla_from_hf(hf), mtp=mtp_from_hf(hf), **({"moe": moe} if moe else {}))
    return cfg


def layer_spec(cfg: TransformerConfig):
    """One spec per layer: MLA attention, a ``MoELayer`` mlp where ``cfg.moe`` says."""
    return gpt_layer_specs(cfg)


def mtp_layer_spec(cfg: TransformerConfig, moe_mlp=None):
    """The layer of every MTP depth: MLA attention with a MoE mlp (``moe_mlp``, default
    ``moe_mlp_spec()``) when ``cfg.is_moe_layer(num_layers)`` (the checkpoint's layer
    ``num_hidden_layers``), else dense."""
    dense = gpt_layer_spec(cfg)
    if not cfg.is_moe_layer(cfg.num_layers):
        return dense
    mlp = moe_mlp or moe_mlp_spec()
    return dense.replace(submodules=dataclasses.replace(dense.submodules, mlp=mlp))


def attention_entries(cfg: TransformerConfig, me: str, att: str) -> dict:
    """MLA parameters under ``me`` (``...self_attention``) <- HF ``att`` (``...self_attn``)."""
    out = {}
    if cfg.mla.q_lora_rank is not None:
        out[f"{me}.linear_q_down_proj.weight"] = pieces(f"{att}.q_a_proj.weight")
        out[f"{me}.q_layernorm.weight"] = pieces(f"{att}.q_a_layernorm.weight")
        out[f"{me}.linear_q_up_proj.weight"] = pieces(f"{att}.q_b_proj.weight")
    else:
        out[f"{me}.linear_q_proj.weight"] = pieces(f"{att}.q_proj.weight")
    out[f"{me}.linear_kv_down_proj.weight"] = pieces(f"{att}.kv_a_proj_with_mqa.weight")
    out[f"{me}.kv_layernorm.weight"] = pieces(f"{att}.kv_a_layernorm.weight")
    out[f"{me}.linear_kv_up_proj.weight"] = pieces(f"{att}.kv_b_proj.weight")
    out[f"{me}.linear_proj.weight"] = pieces(f"{att}.o_proj.weight")
    return out


def layer_entries(cfg: TransformerConfig, me: str, hf: str, moe: bool,
                  correction_bias: bool) -> dict:
    """One decoder layer: parameters under ``me`` <- HF tensors under ``hf``
    (``model.layers.N``)."""
    out = {f"{me}.input_norm.weight": pieces(f"{hf}.input_layernorm.weight"),
           f"{me}.pre_mlp_norm.weight": pieces(f"{hf}.post_attention_layernorm.weight")}
    out.update(attention_entries(cfg, f"{me}.self_attention", f"{hf}.self_attn"))
    mlp = f"{hf}.mlp"
    if not moe:
        f = cfg.ffn_hidden_size
        out[f"{me}.mlp.linear_fc1.weight"] = (Piece(f"{mlp}.gate_proj.weight", f),
                                              Piece(f"{mlp}.up_proj.weight", f))
        out[f"{me}.mlp.linear_fc2.weight"] = pieces(f"{mlp}.down_proj.weight")
        return out
    out.update(expert_entries(me, mlp, cfg.moe.num_experts, cfg.moe.ffn_hidden_size))
    out[f"{me}.mlp.router.expert_bias"] = (pieces(f"{mlp}.gate.e_score_correction_bias")
                                           if correction_bias else NOT_STORED)
    fs = cfg.moe.shared_ffn_hidden_size
    if fs:
        shared = f"{mlp}.shared_experts"
        out[f"{me}.mlp.shared_experts.linear_fc1.weight"] = (
            Piece(f"{shared}.gate_proj.weight", fs), Piece(f"{shared}.up_proj.weight", fs))
        out[f"{me}.mlp.shared_experts.linear_fc2.weight"] = pieces(f"{shared}.down_proj.weight")
    return out


def deepseek_table(cfg: TransformerConfig, tie: bool, correction_bias: bool) -> dict:
    """Weight table of a DeepSeek checkpoint (see the module docstring)."""
    table = {"embedding.weight": pieces("model.embed_tokens.weight"),
             "decoder.final_norm.weight": pieces("model.norm.weight")}
    if not tie:
        table["output_layer.weight"] = pieces("lm_head.weight")
    for i in range(cfg.num_layers):
        table.update(layer_entries(cfg, f"decoder.layers.{i}", f"model.layers.{i}",
                                   cfg.is_moe_layer(i), correction_bias))
    mtp_moe = cfg.is_moe_layer(cfg.num_layers)  # every depth (mtp_layer_spec)
    for d in range(cfg.mtp.num_layers):
        me, hf = f"mtp.layers.{d}", f"model.layers.{cfg.num_layers + d}"
        for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                             ("final_norm", "shared_head.norm")):
            table[f"{me}.{ours}.weight"] = pieces(f"{hf}.{theirs}.weight")
        table.update(layer_entries(cfg, f"{me}.layer", hf, mtp_moe, correction_bias))
    return table


def weight_table(cfg: TransformerConfig, tie: bool) -> dict:
    return deepseek_table(cfg, tie, STORES_CORRECTION_BIAS)


def ignored_tensor(cfg: TransformerConfig, name: str, names) -> bool:
    """Whether checkpoint tensor ``name`` may stay unused: a tensor of an MTP layer (a layer
    ``>= num_hidden_layers`` whose ``eh_proj.weight`` is among the checkpoint's ``names``) when
    MTP is off, and the copies of the embedding and head an MTP layer stores when it is on.
    Other surplus layers (a config with fewer layers than the checkpoint) stay errors."""
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return False
    index = int(parts[2])
    if index < cfg.num_layers or f"model.layers.{index}.eh_proj.weight" not in names:
        return False
    if not cfg.mtp.num_layers:
        return True
    return parts[3] == "embed_tokens" or parts[3:5] == ["shared_head", "head"]
