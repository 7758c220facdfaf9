"""Hugging Face ``generate`` timings of a HF directory, for ``bench_decode.py`` (run under an
interpreter that has torch and transformers).

    python benchmarks/hf_generate_worker.py HF_DIR PROMPTS.npy NEW

``PROMPTS.npy``: int32 ``[B, s]``. The worker loads the model, prints one JSON line
``{"versions"}``, then answers each line ``b`` of stdin (until EOF) with one JSON line
``{"tokens": [b, NEW], "seconds"}``: one greedy ``model.generate`` of the first ``b`` prompts,
exactly ``NEW`` new tokens (a batch size met for the first time is warmed up first, untimed).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import transformers


def main(hf_dir: str, prompts_file: str, new: int) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = np.load(prompts_file)
    print(json.dumps({"versions": f"torch {torch.__version__}, transformers "
                      f"{transformers.__version__}, {torch.get_num_threads()} threads"}),
          flush=True)
    opts = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                eos_token_id=None)
    warm = set()
    with torch.inference_mode():
        for line in sys.stdin:
            b = int(line)
            ids = torch.from_numpy(prompts[:b].astype(np.int64))
            if b not in warm:
                model.generate(ids, **{**opts, "max_new_tokens": 2, "min_new_tokens": 2})
                warm.add(b)
            start = time.perf_counter()
            tokens = model.generate(ids, **opts)
            seconds = time.perf_counter() - start
            print(json.dumps({"tokens": tokens[:, ids.shape[1]:].tolist(), "seconds": seconds}),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
