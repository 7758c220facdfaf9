"""OpenAI request validation and response shapes (``/v1/completions``, ``/v1/chat/completions``).

``parse_completion(body, model)`` / ``parse_chat(body, model)`` check a decoded JSON body and
return ``(prompt or messages, SamplingParams without max_tokens resolved, stream, options)``;
any problem raises ``APIError`` carrying the HTTP status and the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` (``error_body``). Supported parameters:
``model`` (must be the served name), ``max_tokens`` (``max_completion_tokens`` for chat),
``temperature`` in [0, 2] (default 1; 0 = greedy), ``top_p`` in (0, 1], ``stop`` (a string or
up to 4), ``seed`` (an integer), ``n`` (only 1), ``stream``, ``stream_options.include_usage``.
Parameters that would change the answer and are not implemented (``logprobs``, ``echo``,
``best_of`` > 1, ``suffix``, ``tools``, ...) are refused rather than ignored.
"""
from __future__ import annotations

import time
import uuid

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions",
               "response_format", "logit_bias")


class APIError(Exception):
    """An error answered to the client: ``status`` (4xx) and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, key: str, default, low: float, high: float, low_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{key}' must be a number, got {value!r}", key, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{key}'={value} is outside {bounds}", key, "invalid_value")
    return float(value)


def _int(body: dict, key: str, low: int | None = None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{key}' must be an integer, got {value!r}", key, "invalid_type")
    if low is not None and value < low:
        raise APIError(400, f"'{key}'={value}: must be >= {low}", key, "invalid_value")
    return value


def _common(body: dict, served: str) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves "
                       f"'{served}'", "model", "model_not_found")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False):
            raise APIError(400, f"'{key}' is not supported by this server", key, "unsupported")
    if _int(body, "n", 1) not in (None, 1):
        raise APIError(400, "only n=1 is supported (one choice per request)", "n", "unsupported")
    if _int(body, "best_of", 1) not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", "best_of", "unsupported")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop",
                       "invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    return {"temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            "stop": tuple(stop or ()), "seed": _int(body, "seed"), "stream": stream,
            "include_usage": bool(options.get("include_usage", False))}


def parse_completion(body, served: str) -> tuple[str, dict]:
    """``(prompt, options)`` of a ``/v1/completions`` body (``options["max_tokens"]``: the
    request's value or 16, OpenAI's default)."""
    opts = _common(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be one non-empty string", "prompt", "invalid_value")
    max_tokens = _int(body, "max_tokens", 1)
    opts["max_tokens"] = 16 if max_tokens is None else max_tokens
    return prompt, opts


def parse_chat(body, served: str) -> tuple[list, dict]:
    """``(messages, options)`` of a ``/v1/chat/completions`` body (``options["max_tokens"]``:
    ``max_completion_tokens`` or ``max_tokens``, None = up to the context length)."""
    opts = _common(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages", "invalid_value")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant",
                                                              "developer")
                or not isinstance(m.get("content"), str)):
            raise APIError(400, f"messages[{i}] must be {{'role': system|developer|user|"
                           "assistant, 'content': string}", f"messages[{i}]", "invalid_value")
    limit = _int(body, "max_completion_tokens", 1)
    opts["max_tokens"] = _int(body, "max_tokens", 1) if limit is None else limit
    return messages, opts


def _envelope(prefix: str, kind: str, model: str, rid: str | None = None) -> dict:
    return {"id": rid or f"{prefix}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(model: str, text: str, finish: str, use: dict) -> dict:
    out = _envelope("cmpl", "text_completion", model)
    out["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    out["usage"] = use
    return out


def chat_response(model: str, text: str, finish: str, use: dict) -> dict:
    out = _envelope("chatcmpl", "chat.completion", model)
    out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": None, "finish_reason": finish}]
    out["usage"] = use
    return out


def completion_chunk(model: str, rid: str, text: str, finish: str | None) -> dict:
    out = _envelope("cmpl", "text_completion", model, rid)
    out["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    return out


def chat_chunk(model: str, rid: str, delta: dict, finish: str | None) -> dict:
    out = _envelope("chatcmpl", "chat.completion.chunk", model, rid)
    out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return out


def usage_chunk(model: str, rid: str, kind: str, use: dict) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    out = _envelope("", kind, model, rid)
    out["choices"], out["usage"] = [], use
    return out
