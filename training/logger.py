"""What a run tells its user: a progress line, ``metrics.jsonl``, per-rank logs, TensorBoard, MFU.

    log = RunLogger(cfg.logging.output_dir, rank=rank, world_size=world,
                    total_steps=cfg.training.train_iters,
                    flops_per_token=model_flops_per_token(cfg.model),
                    peak_flops=cfg.logging.peak_tflops * 1e12,
                    log_interval=cfg.logging.log_interval, tensorboard=cfg.logging.tensorboard)
    log.step(step, loss=..., lr=..., grad_norm=..., tokens=global_tokens_this_step, step_time=seconds)
    log.eval(step, val_loss)
    log.resumed(step, checkpoint_path)    # after loading a checkpoint, before the next step
    log.close()

Every rank appends its lines to ``output_dir/logs/rank_{r}.log``; rank 0 also prints them, writes
one JSON object per step to ``output_dir/metrics.jsonl`` (``"kind": "train"``; validation results
are lines with ``"kind": "valid"``) and scalars to TensorBoard event files in
``output_dir/tensorboard/`` (tags ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, ``train/mfu``, ``valid/loss``).

A resumed run continues the same files and each step stays recorded once: ``resumed(k, ckpt)``
rewrites ``metrics.jsonl`` atomically without the records of steps after ``k`` (written by the
interrupted run after its checkpoint) and appends ``{"kind": "resumed", "step": k,
"checkpoint": ckpt}``; TensorBoard gets a writer with ``purge_step=k + 1``, whose first event
makes TensorBoard drop the older events of steps ``> k``. A progress line::

    step   20/300 | loss 4.8123 | lr 2.00e-03 | grad 0.912 | 10,342 tok/s | MFU 1.9% | ETA 1m12s

and for the first step of a run, whose time includes building the graph::

    step    1/300 | loss 7.6564 | lr 2.00e-04 | grad 1.517 | 10.9 s incl. compilation

with multi-token prediction (``mtp_metrics``' entries) ``mtp 4.1234`` after ``grad`` (the mean
MTP loss; in metrics.jsonl and TensorBoard as ``mtp_loss``, per depth ``mtp_loss_<k>``),
and for a mixture-of-experts model (``moe_metrics``' entries passed to ``step``), after that:
``aux 0.0102 | experts 181/331/52.4 (min/max/std) | dropped 0.0%`` (the balancing loss, tokens
routed per expert over every MoE layer, the share of assignments dropped over capacity); they
are also in metrics.jsonl and TensorBoard (``train/moe_aux_loss``, ``train/moe_tokens_min``...).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path


def count_parameters(model) -> int:
    """Parameters of a dense Llama-style model from its config (``ModelConfig``-like object).

    Per layer: q/o projections ``2 h^2``, k/v ``2 h (kv * h/heads)``, SwiGLU ``3 h f``, two norms
    ``2 h``; plus the embedding ``V h``, the final norm ``h`` and an untied output head ``V h``.
    """
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    kv_dim = model.num_kv_heads * (h // model.num_heads)
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * f + 2 * h
    head = 0 if model.tie_word_embeddings else v * h
    return model.num_layers * per_layer + v * h + h + head


def model_flops_per_token(model, seq_length: int | None = None) -> float:
    """Training FLOPs per token: ``6 N + 12 L S n d`` (forward + backward, PaLM's convention).

    ``N`` counts the weights one token passes through in matmuls (not the embedding lookup or
    norms): per layer the q / o projections ``2 h n d`` and k / v ``2 h g d`` (``n`` heads,
    ``g`` kv heads, ``d`` = ``model.head_dim`` or ``h / n``), the MLP, then the output head
    ``V h``. The MLP of a dense layer is the SwiGLU ``3 h f``; of a mixture-of-experts layer
    (``model.moe.num_experts`` > 0, every layer from ``model.moe.first_k_dense`` on) the
    *active* weights: the router ``h E``, ``top_k`` experts of ``3 h f_e`` (``f_e`` =
    ``moe.ffn_hidden_size`` or ``f``) and the shared expert ``3 h f_s``. ``12 L S n d`` is the
    attention score and value products (``Q K^T`` and ``A V``, each ``2 S n d`` per token
    forward, times 3 for forward + backward), not halved for the causal mask.
    """
    s = seq_length if seq_length is not None else model.seq_length
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    d = model.head_dim or h // model.num_heads
    attention = 2 * h * model.num_heads * d + 2 * h * model.num_kv_heads * d
    moe = model.moe
    moe_layers = max(model.num_layers - moe.first_k_dense, 0) if moe.num_experts else 0
    expert = 3 * h * (moe.ffn_hidden_size or f)
    moe_mlp = h * moe.num_experts + moe.top_k * expert + 3 * h * moe.shared_ffn_hidden_size
    mlp = (model.num_layers - moe_layers) * 3 * h * f + moe_layers * moe_mlp
    matmul = model.num_layers * attention + mlp + v * h
    return 6.0 * matmul + 12.0 * model.num_layers * model.num_heads * d * s


def estimate_mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak (same device count)."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else float("nan")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


MOE_KEYS = ("moe_aux_loss", "moe_tokens_min", "moe_tokens_max", "moe_tokens_std",
            "moe_dropped_share")


def moe_metrics(aux_loss: float, tokens_per_expert, dropped: float, routed: float) -> dict:
    """The MoE entries of a step record: ``moe_aux_loss`` (the balancing losses added to the
    loss), ``moe_tokens_{min,max,std}`` over ``tokens_per_expert`` (counts of token-expert
    assignments, any shape, e.g. ``[layers, experts]``: every (layer, expert) entry is one
    sample) and ``moe_dropped_share`` = ``dropped / routed`` (assignments over capacity, 0 when
    dropless). Pass them to ``RunLogger.step(..., **moe_metrics(...))``."""
    import numpy as np

    counts = np.asarray(tokens_per_expert, np.float64).reshape(-1)  # [layers * experts]
    if counts.size == 0:
        raise ValueError("moe_metrics: tokens_per_expert is empty")
    return {"moe_aux_loss": float(aux_loss), "moe_tokens_min": float(counts.min()),
            "moe_tokens_max": float(counts.max()), "moe_tokens_std": float(counts.std()),
            "moe_dropped_share": float(dropped) / float(routed) if routed else 0.0}


def mtp_metrics(losses) -> dict:
    """The multi-token-prediction entries of a step record from the per-depth losses ``[D]``:
    ``mtp_loss`` (their mean, the term ``model.mtp.loss_factor`` weighs) and, with D > 1,
    ``mtp_loss_<k>`` for depth k. Pass them to ``RunLogger.step(..., **mtp_metrics(...))``."""
    import numpy as np

    losses = np.asarray(losses, np.float64).reshape(-1)
    out = {"mtp_loss": float(losses.mean())}
    if losses.size > 1:
        out.update({f"mtp_loss_{k}": float(v) for k, v in enumerate(losses, start=1)})
    return out


def format_progress(step: int, total: int, loss: float, lr: float, grad_norm: float | None,
                    tokens_per_s: float, mfu: float | None, eta_s: float,
                    moe: dict | None = None, compile_s: float | None = None) -> str:
    """One progress line (see the module docstring); ``moe``: ``moe_metrics``' entries.

    ``compile_s``: the time of a run's first step, which includes building the graph; given,
    it replaces tokens/s, MFU and the ETA (all three would be dominated by the compilation)."""
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}", f"loss {loss:.4f}", f"lr {lr:.2e}"]
    if grad_norm is not None:
        parts.append(f"grad {grad_norm:.3f}")
    if moe and "mtp_loss" in moe:
        parts.append(f"mtp {moe['mtp_loss']:.4f}")
    if moe and "moe_aux_loss" in moe:
        parts.append(f"aux {moe['moe_aux_loss']:.4f}")
        parts.append(f"experts {moe['moe_tokens_min']:.0f}/{moe['moe_tokens_max']:.0f}"
                     f"/{moe['moe_tokens_std']:.1f} (min/max/std)")
        parts.append(f"dropped {100 * moe['moe_dropped_share']:.1f}%")
    if compile_s is not None:
        parts.append(f"{compile_s:.1f} s incl. compilation")
        return " | ".join(parts)
    parts.append(f"{tokens_per_s:,.0f} tok/s")
    if mfu is not None and math.isfinite(mfu):
        parts.append(f"MFU {100 * mfu:.1f}%")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class RunLogger:
    """Progress lines, ``metrics.jsonl``, per-rank log file and TensorBoard scalars for one run."""

    def __init__(self, output_dir: str | os.PathLike, rank: int = 0, world_size: int = 1,
                 total_steps: int = 0, flops_per_token: float = 0.0, peak_flops: float = 0.0,
                 log_interval: int = 1, tensorboard: bool = True, stream=None, window: int = 20):
        self.out = Path(output_dir)
        self.rank, self.world, self.total = rank, world_size, total_steps
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.log_interval = max(1, log_interval)
        self.stream = stream if stream is not None else sys.stdout
        self.times: deque[float] = deque(maxlen=window)
        self._steps_seen = 0
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self._rank_log = open(self.out / "logs" / f"rank_{rank}.log", "a", encoding="utf-8")
        self._metrics = self._tb = None
        self._tb_wanted = rank == 0 and tensorboard
        if rank == 0:
            self._metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8")

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """A TensorBoard scalar (rank 0; the writer is made on first use, see ``resumed``)."""
        if not self._tb_wanted:
            return
        if self._tb is None:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=str(self.out / "tensorboard"))
        self._tb.add_scalar(tag, value, step)

    def resumed(self, step: int, checkpoint: str) -> None:
        """This run continues from ``checkpoint`` (saved after step ``step``): drop the records
        of later steps (and any line a crash left unparsable) from ``metrics.jsonl`` by an atomic
        rewrite, append a ``"resumed"`` record, and purge TensorBoard events of steps ``> step``.
        Call before recording any step of this run."""
        if self._metrics is not None:
            self._metrics.close()
            path = self.out / "metrics.jsonl"
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if (s := _step_of(line)) is not None and s <= step]
            kept.append(json.dumps({"kind": "resumed", "step": int(step),
                                    "checkpoint": str(checkpoint), "time": time.time()}))
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in kept))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            self._metrics = open(path, "a", encoding="utf-8")
        if self._tb_wanted:
            from tensorboardX import SummaryWriter
            if self._tb is not None:
                self._tb.close()
            # the suffix keeps a new file (names carry only the second) sorting after older ones
            self._tb = SummaryWriter(logdir=str(self.out / "tensorboard"), purge_step=step + 1,
                                     filename_suffix=f".resumed_{step}")
        self.info(f"resumed after step {step} from '{checkpoint}'")

    def info(self, message: str) -> None:
        """A line for this rank's log file (and the console on rank 0)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._rank_log.write(f"[{stamp}] {message}\n")
        self._rank_log.flush()
        if self.rank == 0:
            print(message, file=self.stream, flush=True)

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, tokens: int,
             step_time: float, **extra) -> dict:
        """Record optimizer step ``step`` (1-based); ``tokens``: global tokens in this step.

        Returns the metrics record. The first step this logger records (step 1, or the first
        after a resume) includes the graph compilation: its time is left out of the ETA, and its
        progress line shows that time instead of tokens/s, MFU and ETA (metrics.jsonl keeps
        them). ``extra`` keys (numbers) go to metrics.jsonl and TensorBoard as ``train/<key>``.
        """
        self._steps_seen += 1
        compiling = self._steps_seen == 1 and self.total > 1
        if not compiling:
            self.times.append(step_time)
        tokens_per_s = tokens / step_time if step_time > 0 else float("nan")
        mfu = (estimate_mfu(self.flops_per_token, tokens_per_s, self.peak * self.world)
               if self.flops_per_token and self.peak else None)
        avg = sum(self.times) / len(self.times) if self.times else step_time
        eta = avg * max(self.total - step, 0)
        record = {"kind": "train", "step": step, "loss": float(loss), "lr": float(lr),
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "tokens": int(tokens), "step_time": float(step_time),
                  "tokens_per_s": float(tokens_per_s), "mfu": mfu, "time": time.time(),
                  **{k: float(v) for k, v in extra.items()}}
        if self._metrics is not None:
            self._metrics.write(json.dumps(_finite(record)) + "\n")
            self._metrics.flush()
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", *extra):
            if record.get(key) is not None:
                self._scalar(f"train/{key}", record[key], step)
        if step % self.log_interval == 0 or step == self.total or step == 1:
            moe = {k: record[k] for k in MOE_KEYS} if all(k in extra for k in MOE_KEYS) else {}
            if "mtp_loss" in extra:
                moe["mtp_loss"] = record["mtp_loss"]
            self.info(format_progress(step, self.total, loss, lr, grad_norm, tokens_per_s, mfu, eta,
                                      moe, compile_s=step_time if compiling else None))
        return record

    def eval(self, step: int, loss: float) -> None:
        """Record a validation loss (and its perplexity) at ``step``."""
        ppl = math.exp(min(loss, 50.0))
        if self._metrics is not None:
            record = {"kind": "valid", "step": step, "valid_loss": float(loss), "valid_ppl": ppl,
                      "time": time.time()}
            self._metrics.write(json.dumps(_finite(record)) + "\n")
            self._metrics.flush()
        self._scalar("valid/loss", float(loss), step)
        self.info(f"validation at step {step}: loss {loss:.4f} | ppl {ppl:.2f}")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for fh in (self._metrics, self._rank_log):
            if fh is not None:
                fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _step_of(line: str) -> int | None:
    """The ``step`` of a ``metrics.jsonl`` line, or ``None`` if the line does not parse."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _finite(record: dict) -> dict:
    """JSON has no NaN/Infinity: write them as null so every line parses everywhere."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
