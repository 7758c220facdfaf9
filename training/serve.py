"""An OpenAI-compatible HTTP server for a training checkpoint or a Hugging Face directory.

    python training/serve.py runs/tiny_llama_demo --port 8000
    python training/serve.py path/to/hf_dir --tokenizer path/tokenizer.json --max-batch 16

``SOURCE`` and ``--tokenizer`` are read as by ``training/generate.py`` (checkpoint step
directory, run directory, or HF directory). Endpoints: ``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``, ``/health`` (see docs/serving.md). The served model
name is ``--model-name`` (default: the source directory's name); requests naming another model
get 404. Chat prompts use the ``chat_template`` of ``tokenizer_config.json`` beside the
tokenizer file when there is one, else ``training.data.chat.DEFAULT_TEMPLATE`` (the same
template fine-tuning uses, ``training.data.chat.load_template``).

The main thread owns the model (``training.serving.engine.Engine``, continuous batching of up
to ``--max-batch`` requests over ``--max-model-len`` tokens each); uvicorn serves HTTP on a
second thread. Under msrun with N ranks the model is split tp = N ways
(``training.serving.tp_load``): rank 0 serves HTTP and schedules, announcing every model step to
the other ranks, which replay it on their shards (``training.serving.lockstep``) and ignore
SIGINT / SIGTERM. SIGINT / SIGTERM to the serving process (rank 0; its pid is in the ready
line): stop accepting, fail the requests still waiting, finish the running ones, stop the other
ranks, exit 0. Bad input (source, tokenizer, sizes) prints ``<kind> error: <one line>`` and
exits 2 before the model is built (on every rank).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.errors import exit_on_user_error


def context_length(src, requested: int | None) -> int:
    """The longest prompt + completion: ``--max-model-len``, else the model's own limit
    (``max_position_embeddings`` of the HF config or of the checkpoint's model config)."""
    from models.hf import read_config
    from training.config import ConfigError

    if src.kind == "hf":
        limit = read_config(src.path).get("max_position_embeddings")
    else:
        limit = src.meta["config"]["model"].get("max_position_embeddings")
    limit = int(limit) if limit else None
    if requested is None:
        if limit is None:
            raise ConfigError(f"{src.path}: the model records no max_position_embeddings: "
                              "pass --max-model-len")
        return limit
    if requested < 2 or (limit is not None and requested > limit):
        raise ConfigError(f"--max-model-len={requested}: must be in [2, {limit}] (the model's "
                          "max_position_embeddings)")
    return requested


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="python training/serve.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("source", help="checkpoint step dir, run dir, or Hugging Face dir")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default=None, help="the name clients pass as 'model'")
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="prompt + completion tokens (default: the model's limit)")
    ap.add_argument("--eager", action="store_true", help="decode in PyNative (no jit)")
    return ap.parse_args(argv)


def _check(ns) -> None:
    from training.config import ConfigError

    if ns.max_batch < 1:
        raise ConfigError(f"--max-batch={ns.max_batch}: must be >= 1")
    if not 0 <= ns.port < 65536:
        raise ConfigError(f"--port={ns.port}: must be in [0, 65535]")


def _load_tp(src, world: int):
    """``(model shard, tokenizer, dims)`` of this rank with tp = ``world``."""
    from mcore.parallel_state import ParallelDims
    from training.data.tokenizer import load_tokenizer
    from training.errors import DataError
    from training.serving.tp_load import load_shard

    tok = load_tokenizer(src.tokenizer)
    if tok.vocab_size > src.vocab_size:
        raise DataError(f"tokenizer '{src.tokenizer}' has {tok.vocab_size} tokens but the model's "
                        f"vocabulary has {src.vocab_size} ({src.path}): pass the tokenizer the "
                        "model was trained with")
    dims = ParallelDims.build(tp=world)
    return load_shard(src, dims), tok, dims


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    from mcore.distributed_env import launched_world_size

    world, lockstep = launched_world_size(), None
    with exit_on_user_error():
        _check(ns)
        from training.generate import load, resolve

        src = resolve(ns.source, ns.tokenizer)  # source and tokenizer exist: fail before work
        max_len = context_length(src, ns.max_model_len)
        if world > 1:
            model, tok, dims = _load_tp(src, world)
        else:
            from mcore.distributed_env import set_device

            set_device("CPU")  # eager ops inline (mcore/distributed_env.py)
            model, tok = load(ns.source, ns.tokenizer)
    from training.serving.engine import Engine
    from training.serving.lockstep import Lockstep, follow

    if world > 1:
        lockstep = Lockstep(dims.tp, ns.max_batch, max_len)
    engine = Engine(model, tok, ns.max_batch, max_len, compiled=not ns.eager, lockstep=lockstep)
    engine.warmup()
    if lockstep is not None and not lockstep.leader:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when every rank stops
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        steps = follow(engine, lockstep)
        print(f"rank {dims.tp.rank}: stopped by rank 0 after {steps} steps", flush=True)
        return 0
    return _serve(ns, src, engine, tok, max_len, world)


def _serve(ns, src, engine, tok, max_len: int, world: int) -> int:
    """Rank 0 (or the one process): HTTP on a thread, the engine on this one."""
    import uvicorn

    from training.data.chat import load_template
    from training.data.sft import eos_token_of
    from training.serving.app import Service, build_app

    name = ns.model_name or Path(ns.source).resolve().name
    template = load_template(src.tokenizer.parent, eos_token_of(src.tokenizer.parent))
    service = Service(engine, tok, template, name, max_len)
    server = uvicorn.Server(uvicorn.Config(build_app(service), host=ns.host, port=ns.port,
                                           log_level="warning", timeout_graceful_shutdown=30))
    http = threading.Thread(target=server.run, name="http", daemon=True)

    def shutdown(signum, _frame):
        st = engine.status()
        print(f"{signal.Signals(signum).name}: stopped accepting; finishing {st['running']} "
              f"running requests, failing {st['waiting']} waiting", flush=True)
        engine.close()
        server.should_exit = True

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    http.start()
    while not server.started:
        if not http.is_alive():
            print(f"serve error: cannot listen on {ns.host}:{ns.port}", file=sys.stderr)
            engine.close()
            engine.run()  # nothing is running: returns at once (and stops the other ranks)
            return 2
        time.sleep(0.05)
    print(f"serving '{name}' on http://{ns.host}:{ns.port}/v1 (max batch {ns.max_batch}, "
          f"context {max_len}, chat template: {service.chat.origin}, tp {world}, "
          f"pid {os.getpid()})", flush=True)
    try:
        engine.run()  # until SIGINT / SIGTERM and the running requests are done
    finally:
        server.should_exit = True
        http.join(timeout=40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
