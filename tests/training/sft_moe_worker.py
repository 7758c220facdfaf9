"""The one msrun launch of tests/training/test_finetune_moe.py (2 ranks, ``TMP`` the test's
directory): serve the DeepSeek-V3 fixture (MoE + MLA) with tp=2 through the serving engine in
lockstep (rank 0 schedules, rank 1 replays; rank 0's greedy answers to
``TMP/served_tp2.json``), then fine-tune the tiny MoE model with ep=2, then LoRA on it with
pp=2."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.training.test_finetune_moe import LORA, PROMPTS, SERVE_TOKENS, finetune_args


def serve_tp2(tmp: Path) -> None:
    import mindspore as ms

    from training.generate import resolve
    from training.serve import _load_tp
    from training.serving.engine import Engine, Request, SamplingParams
    from training.serving.lockstep import Lockstep, follow

    ms.set_context(mode=ms.PYNATIVE_MODE)
    model, tok, dims = _load_tp(resolve(str(tmp / "ds3")), 2)
    lockstep = Lockstep(dims.tp, 2, 32)
    engine = Engine(model, tok, 2, 32, compiled=True, lockstep=lockstep)
    engine.warmup()
    if not lockstep.leader:
        follow(engine, lockstep)
        return
    answers = {p: [] for p in PROMPTS}
    for p in PROMPTS:  # queued before the loop starts: admitted together, decoded as a batch
        engine.submit(Request(tok.encode(p), SamplingParams(SERVE_TOKENS, temperature=0),
                              answers[p].append))
    loop = threading.Thread(target=engine.run)
    loop.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(
            a and (a[-1].finish_reason or a[-1].error) for a in answers.values()):
        time.sleep(0.05)
    engine.close()  # then the loop returns and tells rank 1 to stop
    loop.join(60)
    out = {p: "".join(e.text for e in events) for p, events in answers.items()}
    (tmp / "served_tp2.json").write_text(json.dumps(out))


def main(tmp: str) -> None:
    from training.finetune import main as finetune

    tmp = Path(tmp)
    serve_tp2(tmp)  # first: serve.py runs in a fresh process of its own
    assert finetune(finetune_args(tmp, "ep2", "parallel.ep=2")) == 0
    assert finetune(finetune_args(tmp, "lora_pp2", *LORA, "parallel.pp=2")) == 0


if __name__ == "__main__":
    main(sys.argv[1])
