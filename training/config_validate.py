"""Checks of a loaded ``Config``: ranges, divisibility of parallel and batch sizes, derived fields.

``validate(cfg, world_size)`` is called by ``training.config.load_config``; every failure is a
``ConfigError`` whose one-line message names the key(s) at fault.
"""
from __future__ import annotations


CP_COMMS = ("a2a", "ring")  # parallel.cp_comm: context-parallel attention schemes


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the offending key."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _positive(cfg, keys: list[str], minimum: int = 1) -> None:
    for key in keys:
        v = cfg
        for part in key.split("."):  # "model.mla.kv_lora_rank": nested sections
            v = getattr(v, part)
        if v is not None and v < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {v}")


def _divides(a_key: str, a: int, b_desc: str, b: int) -> None:
    if a % b:
        raise ConfigError(f"{a_key}={a} is not divisible by {b_desc}={b}")


def validate(cfg, world_size: int = 1) -> None:
    """Check ranges and divisibility; fill the derived fields. Raises ``ConfigError``."""
    m, p, t, o, d = cfg.model, cfg.parallel, cfg.training, cfg.optimizer, cfg.data
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
    _positive(cfg, ["model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
                    "model.num_kv_heads", "model.ffn_hidden_size", "model.seq_length",
                    "model.max_position_embeddings", "parallel.tp", "parallel.pp", "parallel.vpp",
                    "parallel.ep", "parallel.etp", "parallel.cp", "training.train_iters", "training.micro_batch_size",
                    "training.global_batch_size", "data.corpus_max_bytes",
                    "logging.log_interval", "optimizer.decay_iters", "model.head_dim",
                    "model.attention_block_size", "optimizer.bucket_size", "model.mla.q_lora_rank",
                    "model.mla.kv_lora_rank", "model.mla.qk_nope_head_dim",
                    "model.mla.qk_rope_head_dim", "model.mla.v_head_dim"])
    _positive(cfg, ["training.seed", "training.eval_interval", "training.eval_iters",
                    "optimizer.warmup_iters",
                    "checkpoint.save_interval", "checkpoint.keep_last", "logging.sample_tokens",
                    "training.max_skipped_steps"],
              minimum=0)
    for key, v in [("model.rope_theta", m.rope_theta), ("model.norm_eps", m.norm_eps),
                   ("optimizer.eps", o.eps), ("logging.peak_tflops", cfg.logging.peak_tflops)]:
        if v <= 0:
            raise ConfigError(f"{key} must be > 0, got {v}")
    for key, v in [("optimizer.lr", o.lr), ("optimizer.min_lr", o.min_lr),
                   ("optimizer.weight_decay", o.weight_decay), ("optimizer.clip_grad", o.clip_grad)]:
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr} must not exceed optimizer.lr={o.lr}")
    for key, v in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)]:
        if not 0 <= v < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {v}")
    if not 0 <= d.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction}")
    if cfg.checkpoint.load.strip() == "":
        raise ConfigError("checkpoint.load must be 'none', 'auto' or a checkpoint directory")
    axes = p.order.split("-")
    if sorted(axes) != sorted(["tp", "cp", "ep", "dp", "pp"]):
        raise ConfigError(f"parallel.order={p.order!r} must list each of tp, cp, ep, dp, pp once, "
                          "joined by '-'")

    # model shape
    if m.head_dim is None:
        _divides("model.hidden_size", m.hidden_size, "model.num_heads (or set model.head_dim)",
                 m.num_heads)
    if isinstance(m.recompute_layers, list):
        bad = [i for i in m.recompute_layers if not 0 <= i < m.num_layers]
        if bad or len(set(m.recompute_layers)) != len(m.recompute_layers):
            raise ConfigError(f"model.recompute_layers={m.recompute_layers} must list distinct "
                              f"layer indices in [0, model.num_layers={m.num_layers})")
    _divides("model.num_heads", m.num_heads, "model.num_kv_heads", m.num_kv_heads)
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError(f"model.seq_length={m.seq_length} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}")

    # parallel layout
    mp = p.tp * p.cp * p.pp
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by "
                          f"parallel.tp*parallel.cp*parallel.pp={p.tp}*{p.cp}*{p.pp}={mp}")
    if world_size % (p.etp * p.ep * p.pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.etp*parallel.ep*"
                          f"parallel.pp={p.etp}*{p.ep}*{p.pp}={p.etp * p.ep * p.pp}")
    dp = world_size // mp
    if p.dp is not None and p.dp != dp:
        raise ConfigError(f"parallel.dp={p.dp} is derived and must be world/(tp*cp*pp)={dp} "
                          "(or omitted)")
    if p.world_size is not None and p.world_size != world_size:
        raise ConfigError(f"parallel.world_size={p.world_size} does not match the launch's "
                          f"{world_size} ranks")
    p.dp, p.world_size = dp, world_size
    _divides("model.num_heads", m.num_heads, "parallel.tp", p.tp)
    _divides("model.num_kv_heads", m.num_kv_heads, "parallel.tp", p.tp)
    _divides("model.ffn_hidden_size", m.ffn_hidden_size, "parallel.tp", p.tp)
    _divides("model.vocab_size", m.vocab_size, "parallel.tp", p.tp)
    if p.vpp > 1 and p.pp == 1:
        raise ConfigError(f"parallel.vpp={p.vpp} needs parallel.pp > 1")
    stages = p.pp * p.vpp
    if p.layers_per_stage is None:
        _divides("model.num_layers", m.num_layers, "parallel.pp*parallel.vpp (or set "
                 "parallel.layers_per_stage)", stages)
    elif len(p.layers_per_stage) != stages or sum(p.layers_per_stage) != m.num_layers \
            or min(p.layers_per_stage) < 0:
        raise ConfigError(f"parallel.layers_per_stage={p.layers_per_stage} must have "
                          f"pp*vpp={stages} non-negative entries summing to model.num_layers="
                          f"{m.num_layers}")
    if p.sp:
        _divides("model.seq_length", m.seq_length, "parallel.tp (sequence parallel)", p.tp)
    if p.cp_comm not in CP_COMMS:
        raise ConfigError(f"parallel.cp_comm={p.cp_comm!r} must be one of {', '.join(CP_COMMS)}")
    if p.cp > 1:
        _divides("model.seq_length", m.seq_length, "2*parallel.cp", 2 * p.cp)
        if p.sp and p.tp > 1:
            _divides("model.seq_length", m.seq_length, "parallel.cp*parallel.tp (context and "
                     "sequence parallel)", p.cp * p.tp)
        if p.cp_comm == "a2a":  # the heads of one tp rank are split over cp
            if m.num_heads % (p.tp * p.cp):
                raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tp*"
                                  f"parallel.cp={p.tp * p.cp}: parallel.cp_comm=a2a splits the "
                                  "heads over cp (use parallel.cp_comm=ring)")
            kv = m.num_kv_heads // p.tp
            if kv % p.cp and p.cp % kv:
                raise ConfigError(f"model.num_kv_heads={m.num_kv_heads}: {kv} per tp rank neither "
                                  f"divide nor are divisible by parallel.cp={p.cp} (parallel."
                                  "cp_comm=a2a splits or replicates them over cp; use "
                                  "parallel.cp_comm=ring)")

    _validate_moe(m.moe, p, m)
    _validate_mtp(m.mtp, p)
    if o.distributed and m.moe.num_experts:
        raise ConfigError(f"optimizer.distributed=true with model.moe.num_experts="
                          f"{m.moe.num_experts}: the distributed optimizer does not shard expert "
                          "parameters (reduced over expert-data-parallel ranks); set "
                          "optimizer.distributed=false for MoE models")

    # batch
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size={t.global_batch_size} is not divisible by "
                          f"training.micro_batch_size*dp={t.micro_batch_size}*{dp}={per_step}")
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
        raise ConfigError(f"training.grad_accum_steps={t.grad_accum_steps} is derived and must be "
                          f"global_batch/(micro_batch*dp)={accum} (or omitted)")
    t.grad_accum_steps = accum
    if p.vpp > 1:  # interleaved 1F1B runs micro-batches in groups of pp
        if accum % p.pp:
            raise ConfigError(f"parallel.vpp={p.vpp}: the interleaved schedule needs "
                              f"training.grad_accum_steps ({accum}) divisible by parallel.pp={p.pp}")
        if t.eval_iters % p.pp:
            raise ConfigError(f"parallel.vpp={p.vpp}: the interleaved schedule needs "
                              f"training.eval_iters ({t.eval_iters}) divisible by parallel.pp={p.pp}")
    if cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = cfg.logging.output_dir.rstrip("/") + "/checkpoints"
    if o.decay_iters is not None and o.decay_iters < o.warmup_iters:
        raise ConfigError(f"optimizer.decay_iters={o.decay_iters} is less than "
                          f"optimizer.warmup_iters={o.warmup_iters}")


def _validate_mtp(mtp, p) -> None:
    """``model.mtp`` against itself and the layout (the embedding and the head on one stage)."""
    if mtp.num_layers < 0:
        raise ConfigError(f"model.mtp.num_layers must be >= 0, got {mtp.num_layers}")
    if mtp.loss_factor < 0:
        raise ConfigError(f"model.mtp.loss_factor must be >= 0, got {mtp.loss_factor}")
    if mtp.num_layers and p.pp > 1:
        raise ConfigError(f"model.mtp.num_layers={mtp.num_layers} with parallel.pp={p.pp}: "
                          "multi-token prediction needs the embedding and the head on one stage "
                          "(set parallel.pp=1)")
    if mtp.num_layers and p.sp and p.tp > 1:
        raise ConfigError(f"model.mtp.num_layers={mtp.num_layers} with parallel.sp=true: "
                          "multi-token prediction with sequence parallelism is not implemented")


def _validate_moe(moe, p, m) -> None:
    """``model.moe`` against itself and ``parallel.ep`` / ``parallel.etp`` / ``parallel.tp``."""
    num_layers = m.num_layers
    _positive_moe = [("num_experts", 0), ("top_k", 1), ("shared_ffn_hidden_size", 0),
                     ("num_groups", 0), ("group_topk", 0), ("first_k_dense", 0)]
    for name, minimum in _positive_moe:
        if getattr(moe, name) < minimum:
            raise ConfigError(f"model.moe.{name} must be >= {minimum}, got {getattr(moe, name)}")
    for name in ("aux_loss_coeff", "z_loss_coeff"):
        if getattr(moe, name) < 0:
            raise ConfigError(f"model.moe.{name} must be >= 0, got {getattr(moe, name)}")
    if moe.ffn_hidden_size is not None and moe.ffn_hidden_size < 1:
        raise ConfigError(f"model.moe.ffn_hidden_size must be >= 1, got {moe.ffn_hidden_size}")
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ConfigError(f"model.moe.capacity_factor must be > 0 (or null: dropless), got "
                          f"{moe.capacity_factor}")
    if moe.routed_scaling_factor <= 0:
        raise ConfigError(f"model.moe.routed_scaling_factor must be > 0, got "
                          f"{moe.routed_scaling_factor}")
    E = moe.num_experts
    if E == 0:
        if p.ep > 1 or p.etp > 1:
            raise ConfigError(f"parallel.ep={p.ep}, parallel.etp={p.etp}: expert parallelism "
                              "needs MoE layers (set model.moe.num_experts)")
        return
    if moe.first_k_dense > num_layers:
        raise ConfigError(f"model.moe.first_k_dense={moe.first_k_dense} exceeds model.num_layers="
                          f"{num_layers}")
    if moe.top_k > E:
        raise ConfigError(f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts={E}")
    _divides("model.moe.num_experts", E, "parallel.ep", p.ep)
    if moe.ffn_hidden_size is None:
        _divides("model.moe.ffn_hidden_size (null: model.ffn_hidden_size)", m.ffn_hidden_size,
                 "parallel.etp", p.etp)
    else:
        _divides("model.moe.ffn_hidden_size", moe.ffn_hidden_size, "parallel.etp", p.etp)
    _divides("model.moe.shared_ffn_hidden_size", moe.shared_ffn_hidden_size, "parallel.tp", p.tp)
    if moe.topk_method is not None and (moe.topk_method == "greedy") != (moe.num_groups == 0):
        raise ConfigError(f"model.moe.topk_method={moe.topk_method} "
                          + ("takes no groups (set model.moe.num_groups to 0)" if moe.num_groups
                             else "needs model.moe.num_groups > 0"))
    if moe.num_groups:
        _divides("model.moe.num_experts", E, "model.moe.num_groups", moe.num_groups)
        if not 1 <= moe.group_topk <= moe.num_groups:
            raise ConfigError(f"model.moe.group_topk={moe.group_topk} must be in [1, "
                              f"model.moe.num_groups={moe.num_groups}]")
