"""MindFormers legacy checkpoints (``.ckpt``) and YAML configs of the Llama-style families,
converted to a Hugging Face directory that ``models.from_pretrained`` (and transformers) loads.

    python -m legacy.mindformers model.ckpt run_llama2_7b.yaml out_dir [--fused-blocks N]

**Checkpoint.** Read with ``mindspore.load_checkpoint`` (MindSpore's protobuf reader; nothing is
unpickled). MindFormers names (weights ``[out, in]``, like HF) map one to one:

- ``model.tok_embeddings.embedding_weight`` -> ``model.embed_tokens.weight``;
  ``model.norm_out.weight`` -> ``model.norm.weight``; ``lm_head.weight`` stays.
- per layer ``model.layers.{i}.``: ``attention.wq / wk / wv / wo`` -> ``self_attn.q_proj /
  k_proj / v_proj / o_proj`` (``.weight``, and ``.bias`` for q/k/v), ``attention_norm`` ->
  ``input_layernorm``, ``ffn_norm`` -> ``post_attention_layernorm``, ``feed_forward.w1 / w3 /
  w2`` -> ``mlp.gate_proj / up_proj / down_proj``.

Runs with ``qkv_concat: True`` hold fused tensors, split on load: ``attention.w_qkv``
(``.weight`` / ``.bias``) into ``[q; k; v]`` rows (``hidden_size``, then ``n_kv_heads *
head_dim`` twice) and ``feed_forward.w_gate_hidden.weight`` into ``[w1; w3]`` (gate, then up).
MindFormers splits each tensor-parallel rank's own slice of these rows locally, so a checkpoint
of a run with ``parallel_config.model_parallel = mp`` holds ``mp`` consecutive blocks, block
``r`` being ``[q_r; k_r; v_r]`` (``[w1_r; w3_r]``) of rank ``r``'s heads (rows); a single-file
conversion (MindFormers' ``convert_weight.py --qkv_concat``) is one block. The number of blocks
is the YAML's ``parallel_config.model_parallel`` (absent: 1) unless ``fused_blocks`` is given
(``--fused-blocks N`` on the command line).

Tensors outside ``model.`` / ``lm_head.`` (optimizer moments ``adam_m.*`` / ``adam_v.*``,
``global_step``, ``learning_rate``, loss-scale state) are training state: skipped and listed.
A model tensor with another name is an error listing them.

**YAML.** ``model.model_config`` becomes a HF config: ``num_layers`` -> ``num_hidden_layers``,
``num_heads`` -> ``num_attention_heads``, ``n_kv_heads`` -> ``num_key_value_heads`` (absent:
MHA), ``hidden_size``, ``vocab_size``, ``rms_norm_eps``, ``theta`` -> ``rope_theta``,
``seq_length`` (or ``max_position_embedding``) -> ``max_position_embeddings``,
``tie_word_embeddings``, token ids. The MLP width is ``intermediate_size`` when given, else
Llama's rule from ``multiple_of`` and ``ffn_dim_multiplier``: ``f = int(2 * 4h / 3)``, times
``ffn_dim_multiplier`` if set, rounded up to a multiple of ``multiple_of``.
``qkv_has_bias=True`` (bias on q/k/v only) makes the directory ``model_type`` "qwen2" (that
layout), else "llama". ``extend_method``: "None", "PI" (linear RoPE scaling by
``scaling_factor``) or "LLAMA3" (``scaling_factor`` a dict of ``factor``,
``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``). Runtime knobs
(dtypes, ``use_past``, ``use_flash_attention``, ``parallel_config``, ...) are listed as ignored;
keys this reader does not know are listed as unknown. Neither is dropped silently.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_TOP = {"model.tok_embeddings.embedding_weight": "model.embed_tokens.weight",
        "model.norm_out.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
          "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
          "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj"}
_FUSED = {"attention.w_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "feed_forward.w_gate_hidden": ("mlp.gate_proj", "mlp.up_proj")}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_COPIED = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
           "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "rms_norm_eps": "rms_norm_eps", "theta": "rope_theta",
           "tie_word_embeddings": "tie_word_embeddings", "pad_token_id": "pad_token_id",
           "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}
_USED = set(_COPIED) | {"n_kv_heads", "intermediate_size", "multiple_of", "ffn_dim_multiplier",
                        "seq_length", "max_position_embedding", "qkv_has_bias", "extend_method",
                        "scaling_factor", "qkv_concat"}
_IGNORED = {"type", "batch_size", "compute_dtype", "layernorm_compute_type",
            "softmax_compute_type", "rotary_dtype", "param_init_type", "embedding_init_type",
            "use_past", "use_flash_attention", "use_ring_attention", "use_past_shard", "offset",
            "checkpoint_name_or_path", "repetition_penalty", "max_decode_length", "top_k",
            "top_p", "do_sample", "block_size", "num_blocks", "is_dynamic", "parallel_config",
            "fine_grain_interleave", "pp_interleave_num", "ignore_token_id", "use_rope_slice",
            "scaling_factor_type", "auto_map", "user_defined_pretrain_path",
            "model_name", "moe_config", "input_sliced_sig", "use_attn_mask_compression",
            "compute_in_2d", "pretrain_seqlen"}  # pretrain_seqlen: only for the NTK method


@dataclass
class Conversion:
    """What a conversion produced and what it left out (nothing is dropped unlisted)."""

    config: dict
    tensors: dict = field(default_factory=dict)
    skipped_tensors: list = field(default_factory=list)
    ignored_keys: list = field(default_factory=list)
    unknown_keys: list = field(default_factory=list)
    fused_blocks: int = 1  # row blocks of the fused qkv_concat tensors (the run's model_parallel)


def ffn_size(mc: dict) -> int:
    """The MLP width of a MindFormers Llama config (see the module docstring)."""
    if mc.get("intermediate_size"):
        return int(mc["intermediate_size"])
    multiple = int(mc.get("multiple_of", 256))
    f = int(2 * 4 * int(mc["hidden_size"]) / 3)
    if mc.get("ffn_dim_multiplier") is not None:
        f = int(float(mc["ffn_dim_multiplier"]) * f)
    return multiple * ((f + multiple - 1) // multiple)


def _rope(mc: dict) -> dict:
    method = str(mc.get("extend_method", "None"))
    factor = mc.get("scaling_factor")
    if method == "None":
        return {}
    if method == "PI":
        return {"rope_scaling": {"rope_type": "linear", "factor": float(factor or 1.0)}}
    if method == "LLAMA3" and isinstance(factor, dict):
        return {"rope_scaling": {"rope_type": "llama3", **{k: factor[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if k in factor}}}
    raise ValueError(f"model.model_config.extend_method={method!r} (scaling_factor={factor!r}): "
                     "supported are 'None', 'PI' and 'LLAMA3' with a scaling_factor dict")


def config_from_yaml(doc: dict) -> Conversion:
    """A ``Conversion`` holding the HF config of a MindFormers YAML document (parsed), with the
    ignored and unknown ``model.model_config`` keys listed."""
    try:
        mc = dict(doc["model"]["model_config"])
    except (KeyError, TypeError):
        raise ValueError("MindFormers YAML: no model.model_config mapping") from None
    for key in ("hidden_size", "num_layers", "num_heads", "vocab_size"):
        if mc.get(key) is None:
            raise ValueError(f"MindFormers YAML: model.model_config.{key} is missing")
    hf = {"model_type": "qwen2" if mc.get("qkv_has_bias") else "llama",
          "architectures": ["Qwen2ForCausalLM" if mc.get("qkv_has_bias") else "LlamaForCausalLM"],
          "hidden_act": "silu", "intermediate_size": ffn_size(mc),
          "num_key_value_heads": int(mc.get("n_kv_heads") or mc["num_heads"]),
          "max_position_embeddings": int(mc.get("max_position_embedding")
                                         or mc.get("seq_length") or 4096),
          "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    hf.update({_COPIED[k]: v for k, v in mc.items() if k in _COPIED and v is not None})
    hf.update(_rope(mc))
    parallel = doc.get("parallel_config") or {}
    blocks = parallel.get("model_parallel", 1) if isinstance(parallel, dict) else 1
    return Conversion(config=hf, ignored_keys=sorted(k for k in mc if k in _IGNORED),
                      unknown_keys=sorted(k for k in mc if k not in _USED | _IGNORED),
                      fused_blocks=int(blocks or 1))


def hf_name(name: str) -> str | None:
    """The HF name of a MindFormers model tensor, or None if it has no mapping."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_NAME.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def split_fused(name: str, value: np.ndarray, sizes: tuple, blocks: int) -> list:
    """The parts of a fused tensor whose rows are ``blocks`` consecutive blocks, block ``r``
    holding rows ``[part_0 / blocks; part_1 / blocks; ...]`` (``sizes``: the full row count of
    each part); ``ValueError`` naming ``name`` if its rows do not fit."""
    if blocks < 1 or value.shape[0] != sum(sizes) or any(n % blocks for n in sizes):
        raise ValueError(f"{name}: {value.shape[0]} rows do not hold parts of {list(sizes)} rows "
                         f"in {blocks} block(s) (parallel_config.model_parallel / fused_blocks)")
    per_block = [n // blocks for n in sizes]
    grouped = value.reshape(blocks, sum(per_block), *value.shape[1:])  # [m, rows / m, ...]
    bounds = np.cumsum(per_block)[:-1]
    chunks = np.split(grouped, bounds, axis=1)  # each [m, part / m, ...]
    return [c.reshape(n, *value.shape[1:]) for c, n in zip(chunks, sizes)]  # [part, ...]


def _fused_sizes(module: str, config: dict) -> tuple:
    h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if module == "attention.w_qkv":
        kv = int(config.get("num_key_value_heads", heads)) * (h // heads)
        return h, kv, kv
    return int(config["intermediate_size"]), int(config["intermediate_size"])


def _split_into(conv: Conversion, name: str, value: np.ndarray) -> bool:
    """Split a fused ``qkv_concat`` tensor into ``conv.tensors``; False if ``name`` is none."""
    m = _LAYER_NAME.match(name)
    if not m or m.group(2) not in _FUSED:
        return False
    module, kind = m.group(2), m.group(3)
    parts = split_fused(name, value, _fused_sizes(module, conv.config), conv.fused_blocks)
    for target, part in zip(_FUSED[module], parts):
        conv.tensors[f"model.layers.{m.group(1)}.{target}.{kind}"] = np.ascontiguousarray(part)
    return True


def tensors_from_ckpt(params: dict, conv: Conversion) -> None:
    """Fill ``conv.tensors`` (HF name -> float32 array) from ``params`` (name -> MindSpore
    Parameter or Tensor, as ``mindspore.load_checkpoint`` returns); training state goes to
    ``conv.skipped_tensors``; unmapped model tensors raise ``ValueError`` listing them."""
    import mindspore as ms

    unmapped = []
    for name, value in params.items():
        if not name.startswith(("model.", "lm_head.")):
            conv.skipped_tensors.append(name)
            continue
        target = hf_name(name)
        array = np.asarray(value.astype(ms.float32).asnumpy())
        if target is not None:
            conv.tensors[target] = array
        elif not _split_into(conv, name, array):
            unmapped.append(name)
    if unmapped:
        raise ValueError(f"checkpoint tensor(s) with no Hugging Face mapping: {sorted(unmapped)}")
    conv.skipped_tensors.sort()
    if conv.config.get("tie_word_embeddings"):
        conv.tensors.pop("lm_head.weight", None)


def convert(ckpt, yaml_file, out, fused_blocks: int | None = None) -> Conversion:
    """Convert a MindFormers ``.ckpt`` + YAML into the HF directory ``out`` (config.json +
    float32 model.safetensors); returns the ``Conversion`` with what was skipped or unknown.
    ``fused_blocks``: the row blocks of ``qkv_concat`` tensors (default: the YAML's
    ``parallel_config.model_parallel``)."""
    import mindspore as ms
    import yaml

    from models.safetensors_io import write_checkpoint

    doc = yaml.safe_load(Path(yaml_file).read_text(encoding="utf-8"))
    conv = config_from_yaml(doc)
    if fused_blocks is not None:
        conv.fused_blocks = int(fused_blocks)
    tensors_from_ckpt(ms.load_checkpoint(str(ckpt)), conv)
    out = Path(out)
    write_checkpoint(out, conv.tensors)
    config = dict(conv.config, torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return conv


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    blocks = None
    if len(args) == 5 and args[3] == "--fused-blocks" and args[4].isdigit() and int(args[4]) > 0:
        blocks, args = int(args[4]), args[:3]
    if len(args) != 3:
        print("usage: python -m legacy.mindformers MODEL.ckpt CONFIG.yaml OUT_DIR "
              "[--fused-blocks N]", file=sys.stderr)
        return 2
    conv = convert(*args, fused_blocks=blocks)
    print(f"wrote {args[2]}: model_type={conv.config['model_type']}, "
          f"{len(conv.tensors)} tensors")
    for label, items in (("skipped training-state tensors", conv.skipped_tensors),
                         ("ignored model_config keys", conv.ignored_keys),
                         ("UNKNOWN model_config keys (not used)", conv.unknown_keys)):
        if items:
            print(f"{label}: {', '.join(items)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
