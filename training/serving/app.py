"""The HTTP front end: a Starlette app over an ``Engine``.

``build_app(service)`` routes ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (OpenAI shapes, see ``training.serving.protocol``). Handlers run
on the server's event loop: they validate, tokenise, check the context length, submit one
``Request`` and turn its ``Event``s into one JSON answer or a server-sent-event stream
(``data: {chunk}`` lines ending with ``data: [DONE]``). Every error, including malformed JSON
and unknown routes, is an OpenAI error body with its status; the server keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from training.errors import DataError
from training.serving import protocol as api
from training.serving.engine import (SHUTTING_DOWN, Engine, EngineClosed, Event, Request,
                                     SamplingParams)


@dataclass
class Service:
    """What the handlers need: the engine, its tokenizer, the chat template (``training.data.chat.ChatTemplate``), the served
    model name and the context length (prompt + completion tokens)."""

    engine: Engine
    tokenizer: object
    chat: object
    name: str
    max_len: int
    created: int = 0


def _error(exc: api.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _body(request: HTTPRequest):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise api.APIError(400, f"malformed JSON body: {exc}", None, "invalid_json") from None


def _request(service: Service, text: str, opts: dict, param: str):
    """``(Request, asyncio.Queue of its events)``; 400 if the prompt does not fit."""
    ids = service.tokenizer.encode(text)
    if not ids:
        raise api.APIError(400, f"'{param}' encodes to no tokens", param, "invalid_value")
    room = service.max_len - len(ids)
    max_tokens = room if opts["max_tokens"] is None else opts["max_tokens"]
    if room < 1 or max_tokens > room:
        raise api.APIError(400, f"This model's maximum context length is {service.max_len} "
                           f"tokens; the prompt has {len(ids)} and {max_tokens} more were "
                           "requested", param if room < 1 else "max_tokens",
                           "context_length_exceeded")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone: the client can no longer be answered
            pass

    params = SamplingParams(max_tokens, opts["temperature"], opts["top_p"], opts["stop"],
                            opts["seed"])
    req = Request(list(ids), params, emit)
    try:
        service.engine.submit(req)
    except EngineClosed as exc:
        raise api.APIError(503, str(exc), None, "shutting_down", "server_error") from None
    return req, events


async def _collect(events: asyncio.Queue) -> tuple[str, Event]:
    text = []
    while True:
        ev = await events.get()
        text.append(ev.text)
        if ev.error is not None or ev.finish_reason is not None:
            return "".join(text), ev


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _stream(req: Request, events: asyncio.Queue, chunk, first: list, finish,
            usage) -> StreamingResponse:
    """SSE: ``first`` chunks, one chunk per text delta, the finish chunk, the usage chunk
    (optional), ``[DONE]``. ``chunk(text) / finish(reason) / usage(use)`` build the chunks."""
    async def lines():
        try:
            for c in first:
                yield _sse(c)
            while True:
                ev = await events.get()
                if ev.error is not None:
                    yield _sse(api.error_body(ev.error, "server_error"))
                    break
                if ev.text:
                    yield _sse(chunk(ev.text))
                if ev.finish_reason is not None:
                    yield _sse(finish(ev.finish_reason))
                    if usage is not None:
                        yield _sse(usage(api.usage(ev.prompt_tokens, ev.completion_tokens)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled = True  # finished, or the client went away: free the row
    return StreamingResponse(lines(), media_type="text/event-stream")


def _answer(build, events_done) -> JSONResponse:
    text, ev = events_done
    if ev.error is not None:
        status = 503 if ev.error == SHUTTING_DOWN else 500
        return JSONResponse(api.error_body(ev.error, "server_error"), status_code=status)
    return JSONResponse(build(text, ev.finish_reason,
                              api.usage(ev.prompt_tokens, ev.completion_tokens)))


def _render(template, messages: list[dict]) -> str:
    """The chat prompt; a template that refuses these messages (its ``raise_exception``, e.g.
    roles that do not alternate) is the client's 400, naming ``messages``."""
    try:
        return template.render(messages, add_generation_prompt=True)
    except DataError as exc:
        raise api.APIError(400, str(exc), "messages") from None


def build_app(service: Service) -> Starlette:
    name = service.name

    async def health(_):
        return JSONResponse({"status": "ok", "model": name, **service.engine.status()})

    async def list_models(_):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": service.created, "owned_by": "msformers",
             "max_model_len": service.max_len}]})

    async def completions(request: HTTPRequest):
        try:
            prompt, opts = api.parse_completion(await _body(request), name)
            req, events = _request(service, prompt, opts, "prompt")
        except api.APIError as exc:
            return _error(exc)
        if not opts["stream"]:
            return _answer(lambda *a: api.completion_response(name, *a), await _collect(events))
        rid = f"cmpl-{uuid.uuid4().hex}"
        use = ((lambda u: api.usage_chunk(name, rid, "text_completion", u))
               if opts["include_usage"] else None)
        return _stream(req, events, lambda t: api.completion_chunk(name, rid, t, None), [],
                       lambda r: api.completion_chunk(name, rid, "", r), use)

    async def chat(request: HTTPRequest):
        try:
            messages, opts = api.parse_chat(await _body(request), name)
            prompt = _render(service.chat, messages)
            req, events = _request(service, prompt, opts, "messages")
        except api.APIError as exc:
            return _error(exc)
        if not opts["stream"]:
            return _answer(lambda *a: api.chat_response(name, *a), await _collect(events))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        use = ((lambda u: api.usage_chunk(name, rid, "chat.completion.chunk", u))
               if opts["include_usage"] else None)
        first = [api.chat_chunk(name, rid, {"role": "assistant", "content": ""}, None)]
        return _stream(req, events, lambda t: api.chat_chunk(name, rid, {"content": t}, None),
                       first, lambda r: api.chat_chunk(name, rid, {}, r), use)

    async def http_error(_, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.error_body(str(exc.detail), kind, None, str(exc.status_code)),
                            status_code=exc.status_code)

    service.created = service.created or int(time.time())
    return Starlette(routes=[Route("/health", health), Route("/v1/models", list_models),
                             Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat, methods=["POST"])],
                     exception_handlers={HTTPException: http_error})
