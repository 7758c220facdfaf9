"""Supervised fine-tuning on chat data: ``python -m training.finetune CONFIG [key=value ...]``.

The pre-training loop (``training.pretrain.run``) with three things changed:

- data: ``sft.data``, chat JSON Lines, rendered with the chat template and packed
  (``training.data.sft``); ``--dry-run`` prints one formatted sample with its loss mask and
  the row statistics, then exits (no model is built);
- loss: only assistant tokens count (labels -100 elsewhere); a step's loss is the mean over the
  kept tokens of the whole global batch (all micro-batches and dp ranks;
  ``training.step.TrainStep``), packed samples never attend to each other
  (``mcore.fusions.attention``) and their positions restart at 0;
- start: ``model.hf_path`` (a Hugging Face directory: architecture, weights, tokenizer and chat
  template) or ``sft.init_checkpoint`` (a training checkpoint step directory: model weights
  only, from any parallel layout, through ``training.checkpointing.load_train_state``); ``checkpoint.load`` still resumes
  an interrupted fine-tuning run exactly.

Same config system and outputs as ``training/pretrain.py`` (``msrun ... training/finetune.py
--config FILE parallel.tp=2`` on several ranks). Layouts: tp (with or without sp) x dp x pp
(with vpp), with or without the distributed optimizer; with pp > 1 every stage gets the packed
positions and segment ids (``training.pipeline_step``). MoE models train with the layouts
pre-training allows them (ep x tp x dp with etp, ep x pp x dp): the router sees every position
of a packed row and adds its losses per micro-batch, as in pre-training
(``training.moe_step``). Multi-token prediction (pp = 1): each depth's loss is its token-loss
sum over the global batch / the main loss's kept-token count, with targets inside their own
sample only (``GPTModel.loss_terms``). Bad data stops the run with ``data error: FILE:LINE: ...``.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import ConfigError
from training.errors import exit_on_user_error

DRY_RUN = "--dry-run"


def check_finetune(cfg) -> None:
    """What fine-tuning needs beyond ``training.pretrain.check_supported`` (``ConfigError``)."""
    s = cfg.sft
    if not s.data:
        raise ConfigError("sft.data: give the chat JSON Lines file to fine-tune on")
    if not Path(s.data).is_file():
        raise ConfigError(f"sft.data: '{s.data}' is not a file")
    if cfg.parallel.cp > 1:
        raise ConfigError(f"parallel.cp={cfg.parallel.cp}: fine-tuning trains on packed samples "
                          "(segment masks), which the context-parallel attention does not take "
                          "(set it to 1)")
    if s.init_checkpoint is not None:
        if cfg.model.hf_path:
            raise ConfigError("sft.init_checkpoint and model.hf_path both set: start from one")
        if cfg.lora.enabled:
            raise ConfigError("sft.init_checkpoint with lora.enabled: LoRA fine-tunes a base "
                              "model from model.hf_path (or set sft.init_checkpoint to null)")
        if not (Path(s.init_checkpoint) / "meta.json").is_file():
            raise ConfigError(f"sft.init_checkpoint: '{s.init_checkpoint}' is not a checkpoint "
                              "step directory (no meta.json)")
    if s.template_dir is not None and not Path(s.template_dir).is_dir():
        raise ConfigError(f"sft.template_dir: '{s.template_dir}' is not a directory")


def split_argv(argv: list[str]) -> tuple[list[str], bool]:
    """``(arguments for training.config.parse_cli, dry_run)``: ``--dry-run`` taken out and a
    leading ``CONFIG`` (no ``=``) read as ``--config CONFIG``."""
    dry = DRY_RUN in argv
    rest = [a for a in argv if a != DRY_RUN]
    if rest and not rest[0].startswith("-") and "=" not in rest[0]:
        rest = ["--config", *rest]
    return rest, dry


def init_weights(cfg, step_fn, dims, log) -> None:
    """``sft.init_checkpoint``'s model weights into the step's parameters (before any step).
    The checkpoint must be of the same model (``model.*`` keys, ``model.seq_length`` aside;
    ``CheckpointError`` otherwise); any parallel layout may have saved it."""
    path = cfg.sft.init_checkpoint
    if path is None:
        return
    from training.checkpointing import load_train_state, read_meta

    expected = cfg.to_dict()["model"]
    saved = (read_meta(path)["meta"].get("config") or {}).get("model") or {}
    if "seq_length" in saved:  # the weights do not depend on it: fine-tune at another length
        expected["seq_length"] = saved["seq_length"]
    state = load_train_state(path, step_fn, dims, model_config=expected, weights_only=True)
    log.info(f"weights from training checkpoint '{path}' (step {state['step']}); optimizer fresh")


def first_prompt(template, conversations) -> str:
    """The end-of-run sample's prompt: the first conversation up to its first assistant turn."""
    msgs = conversations[0]
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return template.render(msgs[:first], add_generation_prompt=True)


def show_mask(tokenizer, ids, mask, color: bool) -> str:
    """The sample's text with the tokens that do not count in the loss marked: dimmed (ANSI)
    with ``color``, else inside ``[[`` ``]]``."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            text = tokenizer.decode(ids[start:k])
            if mask[start]:
                out.append(text)
            else:
                out.append(f"\x1b[2m{text}\x1b[0m" if color else f"[[{text}]]")
            start = k
    return "".join(out)


def dry_run(cfg, out=None) -> str:
    """Build the data (cached as a real run would), describe it and one formatted sample."""
    from training.data.sft import build_sft_data

    out = out or sys.stdout
    data = build_sft_data(cfg, log=lambda m: print(m, file=out))
    rows = data.train
    ids = rows.tokens[rows.offsets[0]:rows.offsets[1]].tolist()
    mask = rows.mask[rows.offsets[0]:rows.offsets[1]].tolist()
    color = hasattr(out, "isatty") and out.isatty()
    mark = "dimmed" if color else "inside [[ ]]"
    n_samples = sum(len(r) for r in rows.rows)
    text = (f"sample 0: {len(ids)} tokens, {sum(mask[1:])} in the loss (assistant); tokens "
            f"outside the loss are {mark}\n"
            f"{'-' * 40}\n{show_mask(data.tokenizer, ids, mask, color)}\n{'-' * 40}\n"
            f"{len(rows)} training rows of {cfg.model.seq_length} positions holding {n_samples} "
            f"samples (sft.pack={cfg.sft.pack}), {len(data.valid)} validation rows, "
            f"{data.dropped} sample(s) dropped")
    print(text, file=out, flush=True)
    return text


def check_sft_tokenizer(cfg) -> None:
    """A given ``data.tokenizer`` must load with the run's end-of-sequence token and fit the
    model's vocabulary (``ConfigError``); without one, ``training.data.sft`` uses
    ``model.hf_path``'s or trains a BPE."""
    if cfg.data.tokenizer is None:
        return
    from training.data.sft import eos_token, load_sft_tokenizer, model_vocab
    from training.errors import DataError

    if not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer: '{cfg.data.tokenizer}' is not a file")
    try:
        size = load_sft_tokenizer(Path(cfg.data.tokenizer), eos_token(cfg)).vocab_size
    except DataError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    if size > model_vocab(cfg):
        raise ConfigError(f"data.tokenizer: {size} tokens do not fit the model's vocabulary of "
                          f"{model_vocab(cfg)}")


def parse_args(argv: list[str]):
    """argv (without ``--dry-run``) -> validated ``Config`` (``ConfigError``)."""
    from training.config import load_config, parse_cli
    from training.pretrain import check_supported
    from mcore.distributed_env import launched_world_size

    path, overrides = parse_cli(argv)
    cfg = load_config(path, overrides, world_size=launched_world_size())
    check_supported(cfg, tokenizer=False)
    check_finetune(cfg)
    check_sft_tokenizer(cfg)
    return cfg


def run(cfg, stop_after: int | None = None) -> dict:
    """Fine-tune as configured (``training.pretrain.run`` with the SFT data, loss and start);
    the end-of-run sample answers the first conversation's first prompt."""
    from training.data.chat import load_template, read_conversations, render_turns
    from training.data.sft import build_sft_data, eos_token, template_dir
    from training.pretrain import run as pretrain_run

    # every rank reads and renders the data first: bad data stops all ranks here, before work
    # (rank 0 alone builds the cache; the others would wait for it)
    template = load_template(template_dir(cfg), eos_token(cfg))
    convs = read_conversations(cfg.sft.data)
    for conv in convs:
        render_turns(template, conv)
    prompt = first_prompt(template, convs)
    return pretrain_run(cfg, stop_after, data_fn=build_sft_data, init_fn=init_weights,
                        prompt=prompt)


def main(argv: list[str] | None = None) -> int:
    from training.preflight import check_paths

    args, dry = split_argv(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error():
        cfg = parse_args(args)
        check_paths(cfg)
        if dry:
            dry_run(cfg)
            return 0
        run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
