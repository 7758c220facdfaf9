"""Hugging Face ``generate`` timings of a HF directory, for ``bench_decode.py`` (run under an
interpreter that has torch and transformers; prints one JSON line).

    python benchmarks/hf_generate_worker.py HF_DIR PROMPTS.npy NEW ROUNDS

``PROMPTS.npy``: int32 ``[8, s]`` (batch 1 is its first row). Output: ``{"versions", "1": {...},
"8": {...}}`` with per batch the greedy ``tokens`` (``[b, NEW]``) and the ``seconds`` of each
round (``model.generate``, greedy, exactly ``NEW`` new tokens, after one warm-up call).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import transformers


def main(hf_dir: str, prompts_file: str, new: int, rounds: int) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = np.load(prompts_file)
    out = {"versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"{torch.get_num_threads()} threads"}
    opts = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                eos_token_id=None)
    with torch.inference_mode():
        for b in (1, 8):
            ids = torch.from_numpy(prompts[:b].astype(np.int64))
            model.generate(ids, **{**opts, "max_new_tokens": 2, "min_new_tokens": 2})  # warm up
            seconds = []
            for _ in range(rounds):
                start = time.perf_counter()
                tokens = model.generate(ids, **opts)
                seconds.append(time.perf_counter() - start)
            out[str(b)] = {"tokens": tokens[:, ids.shape[1]:].tolist(), "seconds": seconds}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
