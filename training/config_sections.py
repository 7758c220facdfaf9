"""The sections of a training run's configuration: one dataclass per YAML section, each field
with its default and its documentation (``doc`` metadata, from which ``training.config``
generates the schema table). Parsing, overrides and validation live in ``training.config``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


def _f(default, doc: str, derived: bool = False):
    return field(default=default, metadata={"doc": doc, "derived": derived})


@dataclass
class MoESection:
    """``model.moe``: mixture-of-experts MLPs (``mcore.moe.config.MoEConfig``, mapped by
    ``training.model_bridge.moe_config``). ``num_experts: 0`` keeps every MLP dense."""

    num_experts: int = _f(0, "routed experts per MoE layer (0: dense model, the other moe keys "
                          "are not used)")
    top_k: int = _f(2, "experts chosen per token")
    ffn_hidden_size: int | None = _f(None, "inner width of one expert's SwiGLU MLP (null: "
                                     "model.ffn_hidden_size)")
    shared_ffn_hidden_size: int = _f(0, "inner width of the shared expert every token passes "
                                     "through (0: none)")
    score_function: Literal["softmax", "sigmoid"] = _f("softmax", "router score function")
    normalize_topk: bool = _f(False, "divide the k chosen weights by their sum")
    num_groups: int = _f(0, "group-limited routing: expert groups (0: off)")
    group_topk: int = _f(0, "groups a token may choose from when num_groups > 0")
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] | None = _f(
        None, "DeepSeek's selection (mcore/moe/hf_routing.py): greedy (top-k of all experts), "
        "group_limited_greedy (V2: groups scored by their best expert), noaux_tc (V3: groups "
        "scored by their best two, expert_bias for selection only); softmax scores are then "
        "taken over all experts before the top-k (null: Mixtral's top-k of the logits, groups "
        "scored by their best expert)")
    routed_scaling_factor: float = _f(1.0, "multiply the routing weights by this")
    aux_loss_coeff: float = _f(0.01, "coefficient of the load-balancing loss added to the loss")
    z_loss_coeff: float = _f(0.0, "coefficient of the router z-loss")
    capacity_factor: float | None = _f(None, "expert capacity per token share (null: dropless); "
                                       "over-full experts drop tokens")
    dispatcher: Literal["allgather", "alltoall"] = _f(
        "allgather", "how tokens reach the expert-parallel ranks (alltoall runs eagerly only: "
        "training.mode=pynative)")
    first_k_dense: int = _f(0, "the first k layers keep a dense MLP")
    expert_bias: bool = _f(False, "aux-loss-free balancing: a per-expert bias added to the scores "
                           "for selection only, moved after each applied step by "
                           "bias_update_rate * sign(mean load - load) (load over the global batch)")
    bias_update_rate: float = _f(1e-3, "step of the expert-bias update")


@dataclass
class MTPSection:
    """``model.mtp``: DeepSeek-V3 multi-token prediction (``mcore.transformer.mtp``), off by
    default."""

    num_layers: int = _f(0, "prediction depths (Hugging Face num_nextn_predict_layers); depth k "
                         "predicts the token k+1 ahead with one extra layer sharing the embedding "
                         "and head (0: off; not with parallel.pp > 1 or parallel.sp)")
    loss_factor: float = _f(0.1, "weight of the mean MTP loss added to the training loss "
                            "(logged separately as mtp_loss)")


@dataclass
class MLASection:
    """``model.mla``: multi-latent attention sizes (``mcore.transformer.config.MLAConfig``,
    docs/mla.md); read only with ``model.family: deepseek_v3``."""

    q_lora_rank: int | None = _f(None, "width of the compressed query (null: one direct query "
                                 "projection, DeepSeek-V2-Lite style)")
    kv_lora_rank: int | None = _f(None, "width of the key/value latent the cache stores "
                                  "(required with model.family=deepseek_v3)")
    qk_nope_head_dim: int = _f(128, "per-head query/key dims without rotary")
    qk_rope_head_dim: int = _f(64, "per-head rotary dims (the rotary key is shared by all heads)")
    v_head_dim: int = _f(128, "per-head value width")


@dataclass
class ModelConfig:
    """Architecture of a dense decoder-only model; ``training.model_bridge.transformer_config``
    turns it (with ``training.dtype`` and ``parallel.sp``) into the ``TransformerConfig``."""

    family: Literal["llama", "llama3_1", "qwen2_5", "qwen3", "glm4", "telechat2",
                    "deepseek_v3"] = _f(
        "llama", "model family: fixes the architecture choices the sizes below do not (qkv bias, "
        "qk-norm, partial/interleaved rotary, sandwich norms, output biases, multi-latent "
        "attention; "
        "training/model_bridge.py FAMILIES) and the Hugging Face weight names")
    hf_path: str | None = _f(None, "Hugging Face checkpoint directory to start from: its config.json sets the "
                          "architecture (the size keys below are then not used for the model) and "
                          "its weights the initial values (null: random init from this section)")
    vocab_size: int = _f(2048, "vocabulary size (>= the tokenizer's; divisible by parallel.tp)")
    hidden_size: int = _f(128, "width of the residual stream")
    num_layers: int = _f(2, "number of transformer layers")
    num_heads: int = _f(4, "attention (query) heads")
    num_kv_heads: int = _f(4, "key/value heads (GQA when < num_heads)")
    ffn_hidden_size: int = _f(352, "inner width of the SwiGLU MLP")
    seq_length: int = _f(128, "tokens per training sample")
    max_position_embeddings: int = _f(128, "longest sequence the model is meant for: model.seq_length may not "
                                        "exceed it; a saved Hugging Face config.json carries it")
    rope_theta: float = _f(10000.0, "rotary embedding base")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    tie_word_embeddings: bool = _f(False, "share the input embedding with the output head")
    head_dim: int | None = _f(None, "width of one attention head (null: hidden_size / num_heads; "
                              "Qwen3-style models set it independently)")
    attention_block_size: int = _f(
        1024, "core attention handles at most this many query rows at a time (bounds the "
        "[heads, block, seq] score memory of long sequences)")
    recompute_layers: list[int] | Literal["all"] | None = _f(
        None, "layers whose activations are recomputed in the backward pass instead of kept: "
        "a list of layer indices or 'all' (null: none)")
    moe: MoESection = field(default_factory=MoESection, metadata={
        "doc": "mixture of experts (model.moe.*)", "derived": False})
    mtp: MTPSection = field(default_factory=MTPSection, metadata={
        "doc": "multi-token prediction (model.mtp.*)", "derived": False})
    mla: MLASection = field(default_factory=MLASection, metadata={
        "doc": "multi-latent attention (model.mla.*; model.family=deepseek_v3)",
        "derived": False})


@dataclass
class ParallelConfig:
    """Parallel layout; see mcore.parallel_state.ParallelDims."""

    tp: int = _f(1, "tensor-parallel size")
    pp: int = _f(1, "pipeline-parallel size")
    vpp: int = _f(1, "virtual pipeline stages per pp rank (interleaved 1F1B when > 1)")
    layers_per_stage: list[int] | None = _f(
        None, "layers of each virtual pipeline stage, e.g. [3, 1] (null: model.num_layers split "
        "evenly over pp*vpp)")
    ep: int = _f(1, "expert-parallel size: ranks that split the experts of each MoE layer")
    etp: int = _f(1, "expert tensor-parallel size: ranks that split each expert's weights (the "
                  "expert grid is etp x ep x edp x pp; etp = tp puts them on the tp ranks)")
    cp: int = _f(1, "context-parallel size: every sequence is split over cp ranks (2*cp chunks, "
                 "rank r holds chunks r and 2*cp-1-r; model.seq_length must divide by 2*cp)")
    cp_comm: str = _f("a2a", "context-parallel attention scheme: 'a2a' (all-to-all to a head split, "
                      "heads divisible by tp*cp) or 'ring' (key/value blocks passed around the "
                      "cp ring)")
    sp: bool = _f(False, "sequence parallelism inside the tp group (no effect when tp = 1)")
    order: str = _f("tp-cp-ep-dp-pp", "rank order of the axes, first varies fastest")
    dp: int | None = _f(None, "data-parallel size, derived: world / (tp * cp * pp)", derived=True)
    world_size: int | None = _f(None, "number of ranks, derived from the launcher", derived=True)


@dataclass
class DataConfig:
    """Where the tokens come from."""

    corpus: str = _f("stdlib", "text to train on: 'stdlib' (the bundled default corpus), "
                     "a text file or a directory of text files")
    corpus_max_bytes: int = _f(4_000_000, "size cap of the bundled 'stdlib' corpus")
    tokenizer: str | None = _f(None, "tokenizer.json to load (null: train a byte-level BPE of "
                               "model.vocab_size on the corpus, cached in cache_dir)")
    data_prefix: str | None = _f(None, "prefix of a preprocessed PREFIX.bin/.idx (null: build it "
                                 "from the corpus in cache_dir)")
    cache_dir: str = _f("data_cache", "where a trained tokenizer and built datasets are kept")
    valid_fraction: float = _f(
        0.05, "share of samples (the tail of the token stream) held out for validation")
    append_eod: bool = _f(True, "end every document with the end-of-document token")


@dataclass
class TrainingConfig:
    """Length, batch sizes and execution of the run."""

    train_iters: int = _f(200, "optimizer steps to train")
    micro_batch_size: int = _f(4, "samples per rank per forward/backward")
    global_batch_size: int = _f(8, "samples per optimizer step across all dp ranks")
    grad_accum_steps: int | None = _f(
        None, "micro-batches per step, derived: global_batch / (micro_batch * dp)", derived=True)
    seed: int = _f(1234, "order of the training samples and the end-of-run text sample "
                   "(initial weights are seeded by parameter name, not by this)")
    eval_interval: int = _f(50, "steps between validation runs during training "
                            "(0: only the final one)")
    eval_iters: int = _f(5, "validation batches per validation run (0: no validation in "
                         "pretrain/finetune; evaluate.py: the whole validation split)")
    mode: Literal["graph", "pynative"] = _f(
        "graph", "compile the step (graph) or run eagerly (pynative)")
    dtype: Literal["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"] = _f(
        "float32", "compute dtype of the matmuls (parameters, AdamW, norms, softmax and loss stay "
        "fp32); bf16 is refused on CPU")
    loss_scale: float | None = _f(
        None, "static loss scale for the backward pass (null: 1024 with fp16, else 1)")
    max_skipped_steps: int = _f(
        5, "stop the run after this many consecutive steps whose update was skipped (loss or "
        "gradient norm not finite; 0: never stop)")


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (training/optim.py)."""

    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "learning rate at the end of decay")
    warmup_iters: int = _f(20, "steps of linear warmup from 0 to lr")
    decay_style: Literal["cosine", "linear", "constant"] = _f(
        "cosine", "decay from lr to min_lr after warmup")
    decay_iters: int | None = _f(None, "step where decay ends (null: training.train_iters)")
    weight_decay: float = _f(0.1, "decoupled weight decay (not applied to biases and norm weights)")
    beta1: float = _f(0.9, "Adam first-moment decay")
    beta2: float = _f(0.95, "Adam second-moment decay")
    eps: float = _f(1e-8, "Adam epsilon")
    clip_grad: float = _f(1.0, "global gradient-norm clip (0: off)")
    distributed: bool = _f(False, "distributed optimizer (ZeRO-1): AdamW moments split over the "
                           "data-parallel ranks, gradients reduce-scattered, weights all-gathered "
                           "(not with MoE models)")
    bucket_size: int = _f(4_000_000, "elements per flat bucket of the distributed optimizer")


@dataclass
class CheckpointConfig:
    """Saving and resuming (training/checkpointing.py)."""

    dir: str | None = _f(None, "checkpoint root (null: <logging.output_dir>/checkpoints)")
    save_interval: int = _f(100, "steps between saves (0: only at the end)")
    load: str = _f("none", "'none', 'auto' (newest valid checkpoint in dir) or a step directory")
    keep_last: int = _f(3, "keep this many newest checkpoints (0: keep all)")


@dataclass
class LoggingConfig:
    """Progress line, metrics.jsonl, per-rank logs and TensorBoard (training/logger.py)."""

    log_interval: int = _f(10, "steps between progress lines")
    output_dir: str = _f("runs/demo", "run directory: metrics.jsonl, logs/, tensorboard/")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    peak_tflops: float = _f(0.25, "peak TFLOP/s per rank used for the MFU estimate "
                            "(0.25 ~ fp32 GEMM on a 2-core x86 CPU)")
    sample_tokens: int = _f(48, "tokens of the text sample generated at the end of a run "
                            "(0: no sample)")


@dataclass
class SFTConfig:
    """Supervised fine-tuning (read by training/finetune.py only; docs/finetuning.md)."""

    data: str | None = _f(None, "chat JSON Lines file to fine-tune on ('messages' or "
                          "'prompt'/'response' records)")
    pack: bool = _f(True, "pack several samples into one model.seq_length row (positions "
                    "restart, no attention across samples)")
    template_dir: str | None = _f(None, "directory whose tokenizer_config.json holds the chat "
                                  "template (null: model.hf_path; none there: the default "
                                  "template)")
    init_checkpoint: str | None = _f(None, "training checkpoint step directory whose model "
                                     "weights start the run (null: model.hf_path or fresh)")


@dataclass
class LoRAConfig:
    """LoRA adapters on the frozen model (training/lora.py, models/peft.py); off by default."""

    enabled: bool = _f(False, "train LoRA adapters instead of every weight (base weights frozen)")
    r: int = _f(8, "adapter rank (> 0)")
    alpha: float = _f(16.0, "scaling numerator: the update is alpha / r * B A")
    dropout: float = _f(0.0, "dropout on the adapter input, in [0, 1)")
    target_modules: list[str] | None = _f(None, "Hugging Face module names to adapt, matched as "
                                          "PEFT does (name or '.'-suffix, e.g. q_proj; null: "
                                          "q_proj and v_proj)")
    load: str | None = _f(None, "a PEFT adapter directory to start from (its adapter_config.json "
                          "sets r, alpha, dropout and the modules)")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
    "training": TrainingConfig, "optimizer": OptimizerConfig,
    "checkpoint": CheckpointConfig, "logging": LoggingConfig, "lora": LoRAConfig,
    "sft": SFTConfig,
}


@dataclass
class Config:
    """A whole run: one dataclass per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-serialisable), e.g. for checkpoint metadata."""
        return dataclasses.asdict(self)
