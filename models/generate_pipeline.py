"""Generation with a model split into pipeline stages (``parallel.pp > 1``), with KV caches.

``generate_pipeline(pipeline, input_ids, max_new_tokens, ...)`` takes the same sampling
arguments as ``models.generate`` and returns the same thing (per prompt, the new token ids), on
EVERY rank of the job. ``pipeline``: this rank's ``PipelineModel`` from
``models.gpt_pipeline.build_gpt_pipeline`` (its ``chunk_models``, the GPTModel stages).

One decoding step walks the virtual stages in order ``v = 0 .. pp * vpp - 1`` (stage ``v`` on
pipeline rank ``v % pp``, chunk ``v // pp``): the owner runs its stage on the new tokens (the
first stage embeds token ids, the others take the previous stage's hidden state
``[b, s_new, h]``) and sends its output to the owner of ``v + 1`` (``mcore.comm.p2p`` over the
two-rank neighbour groups; both sides know the shape). The last stage's logits pick the next
tokens (``models.generate.choose_next``), broadcast over the pp group. Each stage keeps a
``KVCache`` of its own layers, so after the prompt every step feeds one token per prompt: the
same tokens as ``models.generate`` on the unsplit model (PyNative; tp ranks inside a stage
run it together).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np

from mcore.comm.collectives import broadcast
from mcore.comm.p2p import recv, send
from models.generate import choose_next, decode_loop, left_pad


def _run_stages(pipeline, caches, ids, positions, key_mask):
    """Logits ``[b, s, V]`` of the last stage (on its rank; ``None`` elsewhere)."""
    dims = pipeline.dims
    pp, me = dims.pp.size, dims.pp_stage
    n = pp * len(pipeline.chunk_models)
    b, s = ids.shape
    hidden = None
    for v in range(n):
        owner, nxt = v % pp, (v + 1) % pp
        if me == owner:
            x = ids if v == 0 else hidden
            out = pipeline.chunk_models[v // pp](x, positions, key_mask, None, caches[v // pp])
            if v == n - 1:
                return out
            send(out, dims.pp_next_pair)  # [b, s, h] to the owner of v + 1
        elif me == nxt and v < n - 1:
            hidden = recv((b, s, pipeline.hidden_size), dims.pp_prev_pair, pipeline.dtype)
    return None


def generate_pipeline(pipeline, input_ids, max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int | None = None, stop_tokens=(), pad_token_id: int = 0) -> list[list[int]]:
    """See the module docstring; arguments as ``models.generate.generate``."""
    dims = pipeline.dims
    last_rank = dims.pp.size - 1
    ids, mask = left_pad(input_ids, pad_token_id)
    rng = np.random.default_rng(seed)
    caches = [m.new_cache() for m in pipeline.chunk_models]

    def next_tokens(step_ids, step_pos, key_mask):
        key_mask = None if key_mask is None else ms.Tensor(key_mask)
        logits = _run_stages(pipeline, caches, ms.Tensor(step_ids), ms.Tensor(step_pos), key_mask)
        nxt = np.zeros(ids.shape[0], np.float32)
        if dims.pp_stage == last_rank:
            nxt = choose_next(logits[:, -1, :].asnumpy(), do_sample, temperature, top_k, top_p,
                              rng).astype(np.float32)
        return broadcast(ms.Tensor(nxt), dims.pp, src=last_rank).asnumpy()  # ids exact in fp32

    return decode_loop(next_tokens, ids, mask, max_new_tokens, stop_tokens, pad_token_id)
