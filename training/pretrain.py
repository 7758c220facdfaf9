"""Pre-train a decoder-only model: ``python training/pretrain.py --config FILE [section.key=value ...]``.

On several ranks: ``msrun --worker_num=2 --local_worker_num=2 training/pretrain.py --config FILE
parallel.tp=2`` (dp is what is left: world / (tp * cp * pp)). Supported layouts: tp x pp x dp, with
``parallel.vpp`` virtual stages per pipeline rank and ``parallel.layers_per_stage`` for uneven
splits, and tp x cp x dp: ``parallel.cp`` splits every sequence over cp ranks
(``training.context_parallel``; attention scheme ``parallel.cp_comm``; not with pp, MoE, MTP,
MLA, ALiBi or LoRA; the sample at the end comes from a twin without cp). ``parallel.sp``
splits the activations outside the tensor-parallel regions along the sequence
(``model.seq_length`` must divide by tp); as in Megatron it is switched off, with a warning in
the log, when tp = 1; the sample at the end comes from a twin without it
(``training.generate.sampling_model``). Mixture of experts (``model.moe.num_experts`` > 0):
tp x ep x dp with experts split over ``parallel.etp``, or ep x pp (and vpp) x dp (tp and pp
together, and sp, are refused for MoE);
the progress line, metrics.jsonl and TensorBoard add the router loss, tokens per expert and the
dropped share of the whole model (``training.moe_step``). With pp > 1 the step is ``training.pipeline_step.PipelineTrainStep`` (1F1B or
interleaved 1F1B), every rank saves its own stage's shard, and the sample is generated through
the stages (``models.generate_pipeline``).

One run, top to bottom (``run``): config -> ``ParallelDims`` -> data -> model -> resume
(``checkpoint.load``) -> loop {batch -> ``TrainStep`` (forward, backward, dp all-reduce, clip,
AdamW) -> progress line / metrics.jsonl / TensorBoard -> periodic validation -> checkpoint} ->
final validation -> a generated sample (printed by rank 0).

Outputs in ``logging.output_dir``: ``metrics.jsonl``, ``logs/rank_N.log``, ``tensorboard/``,
``checkpoints/step_NNNNNN/`` (atomic; model, Adam moments, sampler position, host RNG state).
Bad input stops the run with one line on stderr, ``<kind> error: <message naming the key or
file>``, and exit status 2 (``training.errors``): a bad config key or value, and paths that
cannot work (``data.tokenizer``: ``check_tokenizer_file`` at parse time; ``data.corpus``,
``checkpoint.load``, ``logging.output_dir``: ``training.preflight``) before any work; a corpus too small for one global batch, a checkpoint
that cannot be loaded (``checkpoint.load=auto`` with none that verifies), or a run that
diverges (``training.max_skipped_steps`` non-finite steps in a row, or a NaN tensor at a save:
``numerical error``, checkpoints left as they were) when they are found.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from mcore.distributed_env import launched_world_size
from training.config import load_config, parse_cli
from training.run_checks import (check_model, check_supported, check_tokenizer_file,  # noqa: F401 (re-exported)
                                  check_vocab, precision)
from training.errors import exit_on_user_error

# The sample printed at the end (nucleus sampling: greedy decoding of a small model loops).
# (``logging.sample_tokens`` sets max_new_tokens.)
SAMPLE = {"prompt": "def ", "temperature": 0.8, "top_p": 0.9}


def check_data(cfg, data, log) -> None:
    """Right after the data is loaded: say so when validation is off. (That the tokenizer fits
    ``model.vocab_size`` is checked by ``check_tokenizer_file`` at parse time; a tokenizer
    trained by the run has at most ``model.vocab_size`` tokens, and
    ``training.data.pipeline.build_data`` checks the fit again for its other callers.)"""
    if data.eval_batches is None:
        log(f"data.valid_fraction={cfg.data.valid_fraction:g}: no validation samples, "
            "validation is off")
    elif cfg.training.eval_iters == 0:
        log("training.eval_iters=0: validation is off")


def parse_args(argv: list[str]):
    """argv -> validated ``Config`` (raises ``ConfigError``). The world size comes from msrun."""
    path, overrides = parse_cli(argv)
    cfg = load_config(path, overrides, world_size=launched_world_size())
    check_supported(cfg)
    return cfg


class _Array:
    """A numpy array with the ``load()`` / ``shape`` interface ``models.hf.load_weights`` reads."""

    def __init__(self, value):
        self.value, self.shape = value, value.shape

    def load(self):
        return self.value


def build_model(cfg, dims, read_hf: bool = True):
    """The model of the ``model`` section (``training.model_bridge.build_gpt``: a
    ``TransformerConfig`` straight from the YAML, or ``model.hf_path``'s architecture and
    weights). A fresh model is the same model for every tp and pp size (layers initialise their
    master weights from seeds). pp > 1: this rank's ``PipelineModel``
    (``models.gpt_pipeline.build_pipeline``), else a ``GPTModel``. ``read_hf=False``: keep the
    initial weights (the caller sets them). With ``lora.enabled`` the weights are frozen and
    LoRA adapters attached (``training.lora.apply_config``; with pp > 1 on each stage's chunks,
    ``training.lora_stages``)."""
    from models.hf import load_weights
    from models.safetensors_io import read_checkpoint
    from training.model_bridge import build_gpt, transformer_config

    tensors = read_checkpoint(cfg.model.hf_path) if cfg.model.hf_path and read_hf else None
    if dims.pp.size > 1:
        from models.gpt_pipeline import build_pipeline

        from training.lora import apply_config

        p = cfg.parallel

        def make_stage(spec):
            return build_gpt(cfg, stage=spec, embedding_group=dims.embedding,
                             groups=model_groups(cfg, dims))

        return build_pipeline(make_stage, transformer_config(cfg).num_layers, dims, vpp=p.vpp,
                              layers_per_stage=p.layers_per_stage,
                              jit=cfg.training.mode == "graph", tensors=tensors,
                              prepare=lambda m: apply_config(cfg, m, stage=True))
    from training.lora import apply_config

    model = build_gpt(cfg, groups=model_groups(cfg, dims))
    if tensors is not None:
        load_weights(model, tensors)
    apply_config(cfg, model)  # lora.enabled: freeze the weights, attach adapters (training/lora.py)
    return model


def model_groups(cfg, dims):
    """The ``ModelGroups`` of this rank's model: ``dims``' groups, without the cp group when
    ``parallel.cp`` is 1 (a twin built for decoding in a context-parallel job,
    ``training.generate.sampling_model``)."""
    import dataclasses

    from mcore.parallel_state import ModelGroups, ProcessGroup

    groups = ModelGroups.from_dims(dims)
    if cfg.parallel.cp == 1 and groups.cp.size > 1:
        groups = dataclasses.replace(groups, cp=ProcessGroup.single("cp", dims.global_rank))
    return groups


def compute_dtype(model) -> str:
    """The compute dtype the model was built with (``TransformerConfig.precision``)."""
    first = model.chunk_models[0] if hasattr(model, "chunk_models") else model
    return first.config.precision.compute_dtype


def build_dims(cfg):
    """``ParallelDims`` of the ``parallel`` section (initialises communication on many ranks)."""
    from mcore.parallel_state import ParallelDims

    p = cfg.parallel
    return ParallelDims.build(tp=p.tp, cp=p.cp, pp=p.pp, ep=p.ep, etp=p.etp, order=p.order)


def build_step(cfg, model, dims, grad_accum_steps: int):
    """``TrainStep`` for a ``GPTModel``, ``PipelineTrainStep`` for a pipeline (pp > 1)."""
    from training.step import TrainStep, set_mode

    _, loss_scale = precision(cfg)
    dtype = compute_dtype(model)  # training.dtype, as the model's TransformerConfig holds it
    t = cfg.training
    if dims.pp.size == 1:
        set_mode(t.mode)
        return TrainStep(model, dims, cfg.optimizer, grad_accum_steps, dtype=dtype,
                         loss_scale=loss_scale)
    from training.pipeline_step import PipelineTrainStep

    set_mode("pynative")  # the schedule loop is Python; each stage is compiled (mode "graph")
    return PipelineTrainStep(model, dims, cfg.optimizer, grad_accum_steps, cfg.model.seq_length,
                             t.micro_batch_size, dtype=dtype, loss_scale=loss_scale)


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.logging.output_dir) / "checkpoints")


def tokenizer_path(cfg) -> Path:
    """Where a run keeps a copy of its tokenizer (evaluate.py / generate.py read it)."""
    return Path(cfg.logging.output_dir) / "tokenizer.json"


def resume(cfg, step_fn, data, dims, log) -> int:
    """Load ``checkpoint.load`` (if any) into model, optimizer (moments and AdamW's update count),
    sampler and host RNG, and continue the run's records there (``log.resumed``); return the
    number of steps already done (0 for a fresh run). The checkpoint may come from any parallel
    layout (``training.checkpointing.load_train_state``). ``auto`` logs each checkpoint it skips
    and refuses (``CheckpointError``) when checkpoints exist but none verifies."""
    from training.checkpointing import load_train_state, resolve_load, set_host_rng_state

    path = resolve_load(cfg.checkpoint.load, checkpoint_root(cfg), log=log.info)
    if path is None:
        return 0
    state = load_train_state(path, step_fn, dims, model_config=cfg.to_dict()["model"])
    data.sampler.load_state_dict(state["sampler"])
    set_host_rng_state(state["rng"])
    log.resumed(state["step"], str(path))
    return state["step"]


def save(cfg, step: int, step_fn, data, dims) -> Path:
    """Every rank writes what it owns; rank 0 publishes the checkpoint atomically. If any rank
    holds a NaN or an infinity (all ranks agree first), nothing is written: ``TrainingStopped``."""
    import mindspore as ms

    from mcore.comm import all_reduce, barrier
    from training.checkpointing import first_nonfinite, host_rng_state, save_train_state
    from training.step import TrainingStopped

    bad = first_nonfinite(step_fn.model_state()) or first_nonfinite(step_fn.state_dict())
    if dims.world_size > 1:
        ranks_bad = float(all_reduce(ms.Tensor(float(bad is not None), ms.float32), dims.world).asnumpy())
        bad = bad or (f"(on {ranks_bad:.0f} other rank(s))" if ranks_bad > 0 else None)
    if bad is not None:
        raise TrainingStopped(f"not saving step {step}: tensor {bad} has NaN or infinite values; "
                              f"the checkpoints in '{checkpoint_root(cfg)}' were left as they were")
    sync = (lambda: barrier(dims.world)) if dims.world_size > 1 else None
    meta = {"config": cfg.to_dict(), "sampler": data.sampler.state_dict(), "rng": host_rng_state(),
            "tokenizer": str(tokenizer_path(cfg).resolve())}
    return save_train_state(checkpoint_root(cfg), step, step_fn, dims, meta,
                            keep_last=cfg.checkpoint.keep_last, barrier=sync)


def validate(cfg, step_fn, data) -> float | None:
    """Mean loss over ``training.eval_iters`` fixed validation micro-batches (all dp ranks)."""
    if data.eval_batches is None or cfg.training.eval_iters == 0:
        return None
    batches = [data.valid.batch(ids) for ids in data.eval_batches.batches(cfg.training.eval_iters)]
    return step_fn.evaluate(batches)


def sample(model, tokenizer, seed: int, max_new_tokens: int, prompt: str | None = None) -> str:
    """A sampled continuation of ``prompt`` (default ``SAMPLE["prompt"]``; compiled decoding,
    ``training.generate.generate_text``; every rank must call it)."""
    from training.generate import generate_text

    opts = {**SAMPLE, **({"prompt": prompt} if prompt is not None else {})}
    return generate_text(model, tokenizer, seed=seed, max_new_tokens=max_new_tokens, **opts)


def run(cfg, stop_after: int | None = None, data_fn=None, init_fn=None,
        prompt: str | None = None) -> dict:
    """Train as configured; returns ``{"step", "loss", "valid_loss", "sample"}`` (rank-local).

    ``stop_after``: save a checkpoint and return after that step, as if the job were stopped
    there (a later ``checkpoint.load=auto`` run continues it exactly). The other entry points
    reuse this loop (``training/finetune.py``): ``data_fn(cfg, rank=, dp_rank=, log=)`` replaces
    ``build_data`` (it returns the same fields: ``tokenizer``, ``train``, ``valid``, ``sampler``,
    ``eval_batches``), ``init_fn(cfg, step_fn, dims, log)`` sets the starting weights before
    any step (a resumed checkpoint still wins), ``prompt`` starts the end-of-run sample."""
    import mindspore as ms

    from mcore.comm import barrier
    from training.checkpointing import remove_incomplete, step_dir
    from training.data.pipeline import build_data
    from training.logger import RunLogger, model_flops_per_token
    from training.optim import lr_schedule
    from training.step import TrainingStopped

    t = cfg.training
    dims = build_dims(cfg)
    ms.set_seed(t.seed)
    np.random.seed(t.seed)
    log = RunLogger(cfg.logging.output_dir, rank=dims.global_rank, world_size=dims.world_size,
                    total_steps=t.train_iters, flops_per_token=model_flops_per_token(cfg.model),
                    peak_flops=cfg.logging.peak_tflops * 1e12, log_interval=cfg.logging.log_interval,
                    tensorboard=cfg.logging.tensorboard)
    data = (data_fn or build_data)(cfg, rank=dims.global_rank, dp_rank=dims.dp.rank, log=log.info)
    check_data(cfg, data, log.info)
    model = build_model(cfg, dims)
    dtype, loss_scale = precision(cfg)
    step_fn = build_step(cfg, model, dims, data.sampler.grad_accum_steps)
    if dims.global_rank == 0:
        remove_incomplete(checkpoint_root(cfg), log=log.info)
        data.tokenizer.save(tokenizer_path(cfg))
    if dims.world_size > 1:  # every rank resumes from what rank 0 recovered
        barrier(dims.world)
    if init_fn is not None:
        init_fn(cfg, step_fn, dims, log)
    step = resume(cfg, step_fn, data, dims, log)
    log.info(f"world {dims.world_size} (tp {dims.tp.size} x pp {dims.pp.size}"
             + (f" x cp {dims.cp.size} ({cfg.parallel.cp_comm})" if dims.cp.size > 1 else "")
             + (f" x vpp {cfg.parallel.vpp}" if cfg.parallel.vpp > 1 else "")
             + (f" x ep {dims.ep.size}" if dims.ep.size > 1 else "")
             + f" x dp {dims.dp.size}"
             + (", sequence parallel" if cfg.parallel.sp and dims.tp.size > 1 else "") + "), "
             f"{sum(int(np.prod(p.shape)) for _, p in step_fn.named):,} parameters on this rank, "
             f"{t.grad_accum_steps} micro-batch(es) of {t.micro_batch_size} per step, "
             f"mode {t.mode}, compute {dtype}"
             + (f", loss scale {loss_scale:g}" if loss_scale != 1 else "")
             + (f", resumed at step {step}" if step else ""))
    if cfg.lora.enabled:
        from training.lora import lora_line
        from training.lora_stages import summary

        log.info(lora_line(*summary(model)))
    if cfg.parallel.sp and dims.tp.size == 1:
        log.info("warning: parallel.sp=true has no effect with parallel.tp=1 (sequence "
                 "parallelism splits the sequence over tp); training without it")
    schedule = lr_schedule(cfg.optimizer, t.train_iters)
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    loss = valid_loss = None
    saved, save_due = None, False  # a periodic save waits while updates are being skipped
    while step < t.train_iters:
        t0 = time.perf_counter()
        lr = schedule(step)
        micro = [data.train.batch(ids) for ids in data.sampler.next_step()]  # [(inputs, labels)]
        loss, grad_norm = step_fn(micro, lr)
        step += 1
        log.step(step, loss, lr, grad_norm, tokens=tokens_per_step, step_time=time.perf_counter() - t0,
                 **(getattr(step_fn, "last_moe_metrics", None) or {}),
                 **(getattr(step_fn, "last_mtp_metrics", None) or {}))
        if skips := step_fn.skipped_in_a_row:
            limit = t.max_skipped_steps
            log.info(f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: update skipped "
                     f"({skips} in a row, training.max_skipped_steps={limit})")
            if 0 < limit <= skips:
                log.close()
                span = f"steps {step - skips + 1}-{step} were all" if skips > 1 else f"step {step} was"
                raise TrainingStopped(
                    f"{span} skipped (loss or gradient norm not finite; "
                    f"training.max_skipped_steps={limit}); the checkpoints in "
                    f"'{checkpoint_root(cfg)}' were left as they were: lower optimizer.lr (or "
                    "training.loss_scale with fp16), then resume with checkpoint.load=auto")
        if t.eval_interval and step % t.eval_interval == 0 and step < t.train_iters \
                and (valid_loss := validate(cfg, step_fn, data)) is not None:
            log.eval(step, valid_loss)
        save_due |= bool(cfg.checkpoint.save_interval) and step % cfg.checkpoint.save_interval == 0
        if save_due and not skips:
            saved, save_due = save(cfg, step, step_fn, data, dims), False
        if step == stop_after:
            if saved != step_dir(checkpoint_root(cfg), step):
                save(cfg, step, step_fn, data, dims)
            log.close()
            return {"step": step, "loss": loss, "valid_loss": None, "sample": None}
    if (valid_loss := validate(cfg, step_fn, data)) is not None:
        log.eval(step, valid_loss)
    if saved != step_dir(checkpoint_root(cfg), step):
        save(cfg, step, step_fn, data, dims)
    from training.lora import save_adapter_dir

    if (adapter := save_adapter_dir(cfg, model)) is not None:  # collective over tp
        log.info(f"LoRA adapter (PEFT layout) written to {adapter}")
    text = None
    if cfg.logging.sample_tokens > 0:
        from training.generate import sampling_model

        text = sample(sampling_model(cfg, model, dims), data.tokenizer, t.seed,
                      cfg.logging.sample_tokens, prompt)
        log.info(f"sample (temperature {SAMPLE['temperature']}, top-p {SAMPLE['top_p']}):\n{text}")
    log.close()
    return {"step": step, "loss": loss, "valid_loss": valid_loss, "sample": text}


def config_or_exit(argv: list[str] | None = None):
    """``parse_args`` + ``training.preflight.check_paths`` for an entry point's ``main``: a bad
    config or path prints ``<kind> error: <one line naming the key>`` and exits with status 2."""
    from training.preflight import check_paths

    with exit_on_user_error():
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        check_paths(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = config_or_exit(argv)
    with exit_on_user_error():
        run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
