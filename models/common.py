"""Shared pieces of the family files: HF config fields -> mcore configs, and the weight table of
a Llama-style checkpoint (``model.layers.N.self_attn.q_proj`` ...), which most families reuse
with a few switches; ``moe_decoder_table`` swaps the MLP of the MoE layers for a router and
per-expert tensors (Mixtral, Qwen3-MoE).
"""
from __future__ import annotations

from mcore.transformer.config import RotaryConfig, TransformerConfig
from models.weights import NOT_STORED, ExpertStack, Piece, pieces

_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


def rope_from_hf(hf: dict, interleaved: bool = False, fraction: float | None = None) -> RotaryConfig:
    """``RotaryConfig`` from a HF config: ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (older files); ``partial_rotary_factor`` at either level."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={kind!r}: unsupported (supported: "
                         f"{sorted(_ROPE_TYPES)})")
    base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if fraction is None:
        fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    original = params.get("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings",
                                 hf.get("max_position_embeddings", 8192)))
    optional = {k: params[k] for k in ("low_freq_factor", "high_freq_factor", "beta_fast",
                                       "beta_slow", "mscale", "mscale_all_dim",
                                       "attention_factor", "truncate") if params.get(k) is not None}
    return RotaryConfig(base=float(base), fraction=float(fraction), interleaved=interleaved,
                        scaling=_ROPE_TYPES[kind], factor=float(params.get("factor") or 1.0),
                        original_max_position=int(original), **optional)


def activation_from_hf(hf: dict, key: str = "hidden_act") -> str:
    act = hf.get(key, "silu")
    table = {"silu": "swiglu", "swish": "swiglu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "relu": "relu"}
    if act not in table:
        raise ValueError(f"{key}={act!r}: unsupported activation (supported: {sorted(table)})")
    return table[act]


def decoder_table(cfg: TransformerConfig, tie: bool, prefix: str = "model", qkv_bias: bool = False,
                  out_bias: bool = False, qk_norm: bool = False, fused_gate_up: bool = False,
                  sandwich: bool = False) -> dict:
    """Weight table of a Llama-style HF checkpoint (names under ``prefix``); see models/weights.py."""
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_query_groups * cfg.head_dim
    f = cfg.ffn_hidden_size
    table = {"embedding.weight": pieces(f"{prefix}.embed_tokens.weight"),
             "decoder.final_norm.weight": pieces(f"{prefix}.norm.weight")}
    if not tie:
        table["output_layer.weight"] = pieces("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"{prefix}.layers.{i}", f"decoder.layers.{i}"
        att = f"{hf}.self_attn"
        table[f"{me}.input_norm.weight"] = pieces(f"{hf}.input_layernorm.weight")
        table[f"{me}.pre_mlp_norm.weight"] = pieces(f"{hf}.post_attention_layernorm.weight")
        for kind in ("weight",) + (("bias",) if qkv_bias else ()):
            table[f"{me}.self_attention.linear_qkv.{kind}"] = (
                Piece(f"{att}.q_proj.{kind}", q_rows), Piece(f"{att}.k_proj.{kind}", kv_rows),
                Piece(f"{att}.v_proj.{kind}", kv_rows))
        table[f"{me}.self_attention.linear_proj.weight"] = pieces(f"{att}.o_proj.weight")
        if out_bias:
            table[f"{me}.self_attention.linear_proj.bias"] = pieces(f"{att}.o_proj.bias")
        if qk_norm:
            table[f"{me}.self_attention.q_layernorm.weight"] = pieces(f"{att}.q_norm.weight")
            table[f"{me}.self_attention.k_layernorm.weight"] = pieces(f"{att}.k_norm.weight")
        if fused_gate_up:
            gate_up = f"{hf}.mlp.gate_up_proj.weight"
            table[f"{me}.mlp.linear_fc1.weight"] = (Piece(gate_up, f, count=2, index=0),
                                                    Piece(gate_up, f, count=2, index=1))
        else:
            table[f"{me}.mlp.linear_fc1.weight"] = (Piece(f"{hf}.mlp.gate_proj.weight", f),
                                                    Piece(f"{hf}.mlp.up_proj.weight", f))
        table[f"{me}.mlp.linear_fc2.weight"] = pieces(f"{hf}.mlp.down_proj.weight")
        if sandwich:
            table[f"{me}.post_attn_norm.weight"] = pieces(f"{hf}.post_self_attn_layernorm.weight")
            table[f"{me}.post_mlp_norm.weight"] = pieces(f"{hf}.post_mlp_layernorm.weight")
    return table


def aux_loss_coeff_from_hf(hf: dict, top_k: int, num_moe_layers: int) -> float:
    """``MoEConfig.aux_loss_coeff`` for a HF MoE config: 0 unless ``output_router_logits``
    (transformers adds the loss only then), else ``router_aux_loss_coef * top_k /
    num_moe_layers``. transformers' Switch loss is ``E * sum_i (c_i / T) P_i``, ``top_k`` times
    mcore's ``E / (T k) * sum_i c_i P_i``, and pools the counts and probabilities of all layers
    into ONE loss, where mcore adds one loss per MoE layer: with a single MoE layer (or layers
    that route alike) the summed ``aux`` equals transformers' ``router_aux_loss_coef *
    aux_loss``."""
    if not hf.get("output_router_logits", False):
        return 0.0
    return float(hf.get("router_aux_loss_coef", 0.001)) * top_k / num_moe_layers


def expert_entries(me: str, hf: str, num_experts: int, ffn: int,
                   names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> dict:
    """Weight-table entries of one MoE mlp: parameters under ``me`` (``decoder.layers.N``), HF
    tensors under ``hf`` (``model.layers.N.mlp``): ``gate.weight`` [E, h] is the router, expert
    ``e``'s ``experts.e.<gate|up|down>.weight`` (``names``) stack into ``fc1`` / ``fc2``. The
    router's expert bias (aux-loss-free balancing) is not part of HF checkpoints."""
    gate, up, down = names
    fc1 = ExpertStack(tuple((Piece(f"{hf}.experts.{e}.{gate}.weight", ffn),
                             Piece(f"{hf}.experts.{e}.{up}.weight", ffn))
                            for e in range(num_experts)))
    fc2 = ExpertStack(tuple(pieces(f"{hf}.experts.{e}.{down}.weight")
                            for e in range(num_experts)))
    return {f"{me}.mlp.router.weight": pieces(f"{hf}.gate.weight"),
            f"{me}.mlp.router.expert_bias": NOT_STORED,
            f"{me}.mlp.experts.fc1": fc1, f"{me}.mlp.experts.fc2": fc2}


def moe_decoder_table(cfg: TransformerConfig, tie: bool, moe_module: str = "mlp",
                      expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                      **switches) -> dict:
    """``decoder_table(cfg, tie, **switches)`` with the MLP of every MoE layer
    (``cfg.is_moe_layer``) replaced by ``expert_entries`` under ``model.layers.N.<moe_module>``
    (Mixtral: ``block_sparse_moe`` with ``w1 / w3 / w2``)."""
    table = decoder_table(cfg, tie, **switches)
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        me = f"decoder.layers.{i}"
        del table[f"{me}.mlp.linear_fc1.weight"], table[f"{me}.mlp.linear_fc2.weight"]
        table.update(expert_entries(me, f"model.layers.{i}.{moe_module}", cfg.moe.num_experts,
                                    cfg.moe.ffn_hidden_size, expert_names))
    return table
