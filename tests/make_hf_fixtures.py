"""Write tiny random Hugging Face checkpoints and transformers' outputs for the parity tests.

Run once by a developer (NOT by CI; needs torch + transformers):

    /path/to/venv-with-torch/bin/python tests/make_hf_fixtures.py [--out tests/fixtures/hf]

For each family it builds a 2-layer, hidden-64, vocab-256 model with transformers, randomises
every parameter (weights N(0, 0.1), norm scales 1 + N(0, 0.1), biases N(0, 0.1)), saves it in
bfloat16 safetensors (qwen3 as 3 shards + index), reloads it in float32 and records
``reference.npz``: ``input_ids [2, 8]``, ``logits [2, 8, 256]`` (float32) and ``greedy [2, 8]``
(8 greedy tokens from ``model.generate``). Seeds are fixed; top-2 logit gaps of the greedy
steps are checked so that a 1e-4 difference cannot flip a token.

Mixture-of-experts families (``mixtral``, ``qwen3_moe``): 4 experts, top-2; qwen3_moe keeps
layer 0 dense (``mlp_only_layers=[0]``) and does not renormalise the top-k weights. Their
router logits over the whole greedy sequence are checked too: the gap between the k-th and
the (k+1)-th expert of every token must exceed the same bound, so a 1e-4 difference cannot
change which experts a token reaches. Their ``reference.npz`` also holds ``aux_loss``:
transformers' load-balancing loss on ``input_ids`` (``output_router_logits=True``, before
``router_aux_loss_coef``). ``--only mixtral qwen3_moe`` writes just those. ``qwen2_moe``
(legacy/): 3 layers, layer 1 dense, a gated shared expert, ``norm_topk_prob=True``.

Encoders (``ENCODERS``: ``bert``, ``BertForMaskedLM``; ``make_encoder``): the same tiny sizes,
3 token types; ``reference.npz`` holds MLM logits for a batch with token types and a padded row
(no generation). ``--only bert`` writes just that.

Legacy families (``gpt2``, ``gpt_bigcode`` multi-query, ``gpt_bigcode_mha`` its per-head
interleaved multi-head form, ``bloom`` with ALiBi; ``legacy/``):
configs in their own key names (``LEGACY``), the same tiny sizes, 4 heads, 64 positions.
``--only gpt2 gpt_bigcode bloom`` writes just those.

DeepSeek (``--only deepseek_v3 deepseek_v2``, ``DEEPSEEK``): 3 layers, layer 0 dense, MLA, 8
experts in 2 groups, YaRN; V3 also gets a random MTP layer appended as layer 3 and a random
``e_score_correction_bias``; the selection margins of every gate (group scores and the k-th
kept expert) are checked like the router gaps above. Llama-family aliases (``ALIASES``:
``llama2``, ``llama3_2``, ``deepseek_coder``) are Llama checkpoints with their distinguishing
config choices.

T5 (``t5`` ReLU + tied head, ``t5_v1_1`` gated-GELU + separate head; encoder-decoder, legacy/):
``tests/make_t5_fixtures.py`` (encoder padding mask, labels and loss in ``reference.npz``).

TeleChat2 has no transformers implementation: its reference is a Llama model with biases only
on o_proj and down_proj (TeleChat2's architecture), saved under TeleChat2's weight names.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from make_t5_fixtures import T5_FAMILIES, make_t5  # tests/ is sys.path[0] for this script

VOCAB, HIDDEN, FFN, LAYERS = 256, 64, 128, 2
BASE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=32))),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        head_dim=32, max_position_embeddings=128, rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                          original_max_position_embeddings=32))),
    "glm": (transformers.GlmConfig, transformers.GlmForCausalLM, dict(
        head_dim=16, partial_rotary_factor=0.5)),
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM, dict(
        head_dim=16, partial_rotary_factor=0.5)),
    "telechat": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        attention_bias=True, mlp_bias=True, rope_parameters=dict(rope_type="default",
                                                                 rope_theta=10000.0))),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0],
        rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}
MOE = ("mixtral", "qwen3_moe", "qwen2_moe")
_GPT2_SIZES = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64,
                   bos_token_id=1, eos_token_id=2)
LEGACY = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(_GPT2_SIZES)),
    "gpt_bigcode": (transformers.GPTBigCodeConfig, transformers.GPTBigCodeForCausalLM,
                    dict(_GPT2_SIZES, multi_query=True)),
    "gpt_bigcode_mha": (transformers.GPTBigCodeConfig, transformers.GPTBigCodeForCausalLM,
                        dict(_GPT2_SIZES, multi_query=False)),
    "bloom": (transformers.BloomConfig, transformers.BloomForCausalLM, dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=4, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)),
}
FAMILIES.update(LEGACY)
# Llama-family aliases whose numerics no other fixture covers (all model_type "llama"): Llama 2
# (MHA, plain RoPE; CodeLlama and Yi differ only in rope_theta), Llama 3.2 (tied head + llama3
# scaling), DeepSeek-Coder (linear RoPE scaling).
ALIASES = {
    "llama2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_key_value_heads=4, rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "llama3_2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))),
    "deepseek_coder": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters=dict(rope_type="linear", rope_theta=100000.0, factor=4.0))),
}
FAMILIES.update(ALIASES)
# DeepSeek (MLA + DeepSeek routing): 3 layers, layer 0 dense (first_k_dense_replace=1), 8 routed
# experts in 2 groups (topk_group=1), YaRN rotary. V3: q_lora_rank, sigmoid noaux_tc routing
# with a random e_score_correction_bias, one shared expert, and a random MTP layer stored as
# layer num_hidden_layers (written after transformers saved the model: it has no MTP module).
# V2: V2-Lite style (q_lora_rank None), softmax group_limited_greedy, two shared experts.
_DEEPSEEK = dict(num_hidden_layers=3, num_key_value_heads=4, moe_intermediate_size=32,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                 first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, head_dim=4, max_position_embeddings=128,
                 rms_norm_eps=1e-6)
DEEPSEEK = {
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        _DEEPSEEK, q_lora_rank=32, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, rope_interleave=True, num_nextn_predict_layers=1,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                             mscale=1.0, mscale_all_dim=0.8))),
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, dict(
        _DEEPSEEK, q_lora_rank=None, n_shared_experts=2, routed_scaling_factor=1.5,
        topk_method="group_limited_greedy", norm_topk_prob=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                             mscale=0.707, mscale_all_dim=0.707))),
}
FAMILIES.update(DEEPSEEK)
# Qwen2-MoE (legacy/qwen2_moe.py): 3 layers, layer 1 dense (mlp_only_layers), q/k/v biases, a
# shared expert with its sigmoid gate, renormalised top-k.
FAMILIES["qwen2_moe"] = (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, dict(
    num_hidden_layers=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
    num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[1], rope_parameters=dict(rope_type="default", rope_theta=1e6)))
# Encoders (no generation): BERT masked LM with 3 token types, 64 positions.
ENCODERS = {
    "bert": (transformers.BertConfig, transformers.BertForMaskedLM, dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=4, max_position_embeddings=64, type_vocab_size=3, pad_token_id=0)),
}
# families whose default seed (100 + index) gives a too-small top-2 or router gap
SEEDS = {"llama2": 7, "deepseek_v3": 1, "deepseek_v2": 9, "qwen2_moe": 1}


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def telechat_tensors(model, cfg) -> dict:
    """The Llama reference model's weights under TeleChat2's names (k/v interleaved per head)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    d, n_kv = cfg.head_dim, cfg.num_key_value_heads
    out = {"transformer.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}", f"transformer.h.{i}"
        k = sd[f"{src}.self_attn.k_proj.weight"].reshape(n_kv, 1, d, HIDDEN)
        v = sd[f"{src}.self_attn.v_proj.weight"].reshape(n_kv, 1, d, HIDDEN)
        out.update({
            f"{dst}.input_layernorm.weight": sd[f"{src}.input_layernorm.weight"],
            f"{dst}.self_attention.query.weight": sd[f"{src}.self_attn.q_proj.weight"],
            f"{dst}.self_attention.key_value.weight": torch.cat([k, v], 1).reshape(-1, HIDDEN),
            f"{dst}.self_attention.dense.weight": sd[f"{src}.self_attn.o_proj.weight"],
            f"{dst}.self_attention.dense.bias": sd[f"{src}.self_attn.o_proj.bias"],
            f"{dst}.post_attention_layernorm.weight": sd[f"{src}.post_attention_layernorm.weight"],
            f"{dst}.mlp.gate_proj.weight": sd[f"{src}.mlp.gate_proj.weight"],
            f"{dst}.mlp.up_proj.weight": sd[f"{src}.mlp.up_proj.weight"],
            f"{dst}.mlp.down_proj.weight": sd[f"{src}.mlp.down_proj.weight"],
            f"{dst}.mlp.down_proj.bias": sd[f"{src}.mlp.down_proj.bias"],
        })
    return out


def telechat_config(cfg) -> dict:
    return {"architectures": ["TelechatForCausalLM"], "model_type": "telechat",
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": LAYERS,
            "n_head": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "ffn_hidden_size": FFN, "layer_norm_epsilon": cfg.rms_norm_eps,
            "tie_word_embeddings": False, "base_seqlen": 8192, "training_seqlen": 8192,
            "logn": True, "embed_layernorm": False,
            "apply_residual_connection_post_layernorm": False}


def zero_llama_biases_for_telechat(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias",
                              "up_proj.bias")):
                p.zero_()


def make(family: str, out: Path, seed: int) -> dict:
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = config_cls(**(extra if family in LEGACY else {**BASE, **extra}))
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomise(model, seed)
    if family == "telechat":
        zero_llama_biases_for_telechat(model)
    if family == "deepseek_v3":  # a buffer, not a parameter: randomise() leaves it at 0
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
    # bf16 on disk; the reference computes in fp32 from exactly those rounded weights.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    target = out / family
    shutil.rmtree(target, ignore_errors=True)
    if family == "telechat":
        target.mkdir(parents=True)
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in telechat_tensors(model, cfg).items()}
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps(telechat_config(cfg), indent=2))
        ref_model = model
    else:
        shard = "100KB" if family == "qwen3" else "50MB"
        model.to(torch.bfloat16).save_pretrained(target, max_shard_size=shard)
        ref_model = model_cls.from_pretrained(target, dtype=torch.float32).eval()
    if family == "deepseek_v3":
        add_mtp_layer(target, cfg, seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(2, 8)).astype(np.int64)
    with torch.no_grad():
        logits = ref_model(torch.from_numpy(ids)).logits.float().numpy()
        gen = ref_model.generate(torch.from_numpy(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        greedy = gen[:, ids.shape[1]:].numpy()
        # smallest top-1 / top-2 gap over the greedy steps (full recompute of each prefix)
        full = ref_model(gen).logits.float().numpy()[:, ids.shape[1] - 1:-1]
        top2 = np.sort(full, -1)[..., -2:]
        gap = float((top2[..., 1] - top2[..., 0]).min())
        router_gap = router_topk_gap(ref_model, gen, cfg) if family in MOE else None
        if family in DEEPSEEK:
            router_gap = deepseek_router_gap(ref_model, gen, cfg)
        extra = {}
        if family in MOE:  # transformers' Switch loss (before router_aux_loss_coef) on input_ids
            extra["aux_loss"] = np.float32(
                ref_model(torch.from_numpy(ids), output_router_logits=True).aux_loss)
    np.savez(target / "reference.npz", input_ids=ids.astype(np.int32), logits=logits,
             greedy=greedy.astype(np.int32), **extra)
    return {"family": family, "min_top2_gap": gap, "min_router_gap": router_gap,
            "bytes": sum(f.stat().st_size for f in target.iterdir())}


def make_encoder(family: str, out: Path, seed: int) -> dict:
    """A randomised encoder saved in bfloat16 and ``reference.npz``: ``input_ids [2, 8]``,
    ``token_type_ids [2, 8]`` (types 0..2), ``attention_mask [2, 8]`` (row 1 ends in 3 padding
    tokens) and transformers' MLM ``logits [2, 8, 256]`` on them (float32)."""
    config_cls, model_cls, extra = ENCODERS[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**extra)).eval()
    randomise(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):  # norm scales near 1
                p.add_(1.0)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    target = out / family
    shutil.rmtree(target, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(target)
    ref_model = model_cls.from_pretrained(target, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(2, 8)).astype(np.int64)
    types = rng.integers(0, 3, size=(2, 8)).astype(np.int64)
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    ids[1, 5:] = 0  # [PAD]
    with torch.no_grad():
        logits = ref_model(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types),
                           attention_mask=torch.from_numpy(mask)).logits.float().numpy()
    np.savez(target / "reference.npz", input_ids=ids.astype(np.int32),
             token_type_ids=types.astype(np.int32), attention_mask=mask.astype(np.int32),
             logits=logits)
    return {"family": family, "bytes": sum(f.stat().st_size for f in target.iterdir())}


def router_topk_gap(model, tokens, cfg) -> float:
    """Smallest gap, over every MoE layer and token of ``tokens``, between the router logits of
    the k-th and (k+1)-th expert (softmax is monotone, so this bounds the selection)."""
    k = cfg.num_experts_per_tok
    out = model(tokens, output_router_logits=True)
    gaps = []
    for layer_logits in out.router_logits:  # one [b*s, E] per MoE layer
        ranked = np.sort(layer_logits.float().numpy(), -1)[:, ::-1]
        gaps.append(float((ranked[:, k - 1] - ranked[:, k]).min()))
    if not gaps:
        raise SystemExit("no router logits returned: is this a mixture-of-experts model?")
    return min(gaps)


def add_mtp_layer(target: Path, cfg, seed: int) -> None:
    """Append a random DeepSeek-V3 MTP layer (layer ``num_hidden_layers``: enorm, hnorm,
    eh_proj, shared_head.norm, and a full decoder layer copied in shape from the last one) to
    ``target/model.safetensors``, as released V3 checkpoints store it."""
    from safetensors.torch import load_file

    file = target / "model.safetensors"
    tensors = load_file(str(file))
    n = cfg.num_hidden_layers
    last, mtp = f"model.layers.{n - 1}.", f"model.layers.{n}."
    gen = torch.Generator().manual_seed(seed + 2)
    new = {mtp + n[len(last):]: torch.randn(t.shape, generator=gen) * 0.1
           for n, t in tensors.items() if n.startswith(last)}
    h = cfg.hidden_size
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        new[mtp + name] = 1.0 + torch.randn(h, generator=gen) * 0.1
    new[mtp + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=gen) * 0.1
    tensors.update({n: t.to(torch.bfloat16) for n, t in new.items()})
    save_file(tensors, str(file), metadata={"format": "pt"})


def deepseek_router_gap(model, tokens, cfg) -> float:
    """Smallest selection margin of every DeepSeek gate over ``tokens``: between the kept and
    the best dropped group score, and between the k-th and (k+1)-th kept expert score."""
    inputs = []
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    hooks = [g.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0])))
             for g in gates]
    model(tokens)
    for hook in hooks:
        hook.remove()
    k, G, kg = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    gaps = []
    for gate, x in inputs:
        logits = x.reshape(-1, x.shape[-1]).float() @ gate.weight.float().T  # [T, E]
        if cfg.model_type == "deepseek_v3":
            scores = logits.sigmoid() + gate.e_score_correction_bias
            group = scores.view(-1, G, scores.shape[-1] // G).topk(2, -1).values.sum(-1)
        else:
            scores = logits.softmax(-1)
            group = scores.view(-1, G, scores.shape[-1] // G).max(-1).values
        ranked_groups = group.sort(-1, descending=True).values
        gaps.append(float((ranked_groups[:, kg - 1] - ranked_groups[:, kg]).min()))
        keep = group.topk(kg, -1).indices  # [T, kg]
        per = scores.view(-1, G, scores.shape[-1] // G)
        kept = torch.gather(per, 1, keep[..., None].expand(-1, -1, per.shape[-1]))
        ranked = kept.reshape(kept.shape[0], -1).sort(-1, descending=True).values
        gaps.append(float((ranked[:, k - 1] - ranked[:, k]).min()))
    return min(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "fixtures" / "hf"))
    parser.add_argument("--only", nargs="+",
                        choices=list(FAMILIES) + list(ENCODERS) + list(T5_FAMILIES),
                        default=list(FAMILIES) + list(ENCODERS) + list(T5_FAMILIES),
                        help="families to (re)write; the others are left untouched")
    args = parser.parse_args()
    out = Path(args.out)
    for family in args.only:
        if family in ENCODERS:
            print(make_encoder(family, out, seed=SEEDS.get(family, 300)))
            continue
        if family in T5_FAMILIES:
            info = make_t5(family, out,
                           seed=SEEDS.get(family, 200 + list(T5_FAMILIES).index(family)))
        else:
            info = make(family, out, seed=SEEDS.get(family, 100 + list(FAMILIES).index(family)))
        print(info)
        if info["min_top2_gap"] < 1e-3:
            raise SystemExit(f"{family}: greedy top-2 gap {info['min_top2_gap']} too small; "
                             "change the seed")
        if info["min_router_gap"] is not None and info["min_router_gap"] < 1e-3:
            raise SystemExit(f"{family}: router top-k gap {info['min_router_gap']} too small; "
                             "change the seed")
    print("transformers", transformers.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()
