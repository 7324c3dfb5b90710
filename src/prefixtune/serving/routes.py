"""The HTTP surface: every endpoint, what it answers, and the handlers that give errors OpenAI's shape.

- POST /v1/completions, /v1/chat/completions (`generate`): max_tokens, temperature (0: greedy),
  top_p, stop, n, stream (server-sent events), stream_options.include_usage; unsupported OpenAI
  fields are refused (422) rather than silently ignored. A request is tokenised, checked and queued
  (`PrefixServer.submit`), then answered as one JSON body once every choice has finished, or as
  events while tokens arrive. A streamed request waits for its first events before answering, so a
  request that fails at once still gets its HTTP status instead of an error inside a 200 stream.
- POST /v1/classify (`classify`): {"model", "input": str | [str]} -> label and probabilities per
  input, named by the base model's config (id2label). Not an OpenAI endpoint, but it follows their
  conventions (a `model` field naming the prefix, a list of `data`, `usage`).
- GET /v1/models, /v1/models/{id}, /health.
- POST /admin/prefixes/{name}[?replace=true] with {"config": <the prefixtune_config.json object>,
  "weights": <base64 of prefixtune_model.safetensors>}, and DELETE /admin/prefixes/{name}: both need
  `Authorization: Bearer <admin token>` and are disabled without one (`guards`); `PrefixFolder`
  validates an upload before it becomes visible.

Errors: 400 over a limit, 404 unknown model, 413 body too large, 422 malformed, 500 a failure inside
generation (only that request's), 503 queue full, 504 timed out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixtune.serving.guards import admin_error
from prefixtune.serving.limits import RequestError, error_body
from prefixtune.serving.schemas import ChatRequest, ClassifyRequest, CompletionRequest, UploadRequest
from prefixtune.serving.server import PrefixServer
from prefixtune.serving.work import Sink, Transcript, Work

log = logging.getLogger("prefixtune.server")


def install_routes(app: FastAPI, srv: PrefixServer) -> None:
    _install_error_handlers(app)

    @app.post("/v1/completions")
    async def completion(body: CompletionRequest, request: Request) -> Response:
        return await generate(srv, request, body)

    @app.post("/v1/chat/completions")
    async def chat_completion(body: ChatRequest, request: Request) -> Response:
        return await generate(srv, request, body)

    @app.post("/v1/classify")
    async def classification(body: ClassifyRequest, request: Request) -> dict:
        return await classify(srv, request, body)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [srv.card(None)] + [srv.card(n) for n in srv.folder.names()]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        prefix = await srv.find(name)
        return srv.card(prefix)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = srv.batcher.alive
        body = {
            "status": "ok" if ok else "worker stopped",
            "model": srv.base_id,
            "prefixes": len(srv.folder.names()),
            "queued": srv.batcher.pending(),
            "stats": dict(srv.batcher.stats),
            "prefix_errors": srv.folder.errors,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/admin/prefixes/{name}", status_code=201)
    async def upload(name: str, body: UploadRequest, request: Request, replace: bool = False) -> dict:
        _check_admin(srv, request, name)
        try:
            weights = await asyncio.to_thread(base64.b64decode, body.weights, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"weights must be base64: {exc}") from exc
        await srv.batcher.call(lambda: srv.folder.install(name, body.config, weights, replace))
        return srv.card(name)

    @app.delete("/admin/prefixes/{name}")
    async def delete(name: str, request: Request) -> dict:
        _check_admin(srv, request, name)
        await srv.batcher.call(lambda: srv.folder.delete(name))
        return {"id": name, "object": "model", "deleted": True}


# ------------------------------------------------------------------------------ errors
def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()[:5]
        ]
        return error_response(RequestError(422, "invalid request: " + "; ".join(parts), code="invalid_body"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(RequestError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(RequestError.of(exc))


def _check_admin(srv: PrefixServer, request: Request, name: str) -> None:
    """The token again (the `BodyLimit` guard checked it before the body) and the prefix name."""
    err = admin_error(srv.settings.admin_token, request.headers)
    if err is not None:
        raise err
    srv.check_name(name)


# ------------------------------------------------------------------------------ completions and classification
def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose every write must finish within `send_timeout` seconds, so a client
    that stops reading is dropped (its request cancelled) instead of holding it forever."""

    def __init__(self, content: AsyncIterator[str], send_timeout: float):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.send_timeout = send_timeout

    async def stream_response(self, send: Callable) -> None:
        async def timed_send(message: dict) -> None:
            await asyncio.wait_for(send(message), self.send_timeout)

        try:
            await super().stream_response(timed_send)
        except TimeoutError:
            log.warning("dropping a stream: the client read nothing for %.0f s", self.send_timeout)
            await self.body_iterator.aclose()


def _head(ident: str, kind: str, model: str) -> dict:
    """The fields every completion body or chunk starts with."""
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model}


async def generate(srv: PrefixServer, request: Request, body: CompletionRequest | ChatRequest) -> Response:
    chat = isinstance(body, ChatRequest)
    prefix = await srv.lookup(body.model, "generate")
    warning = srv.chat_mismatch(prefix) if chat else None
    if warning and warning not in srv.warned:  # once per prefix, in the server's log
        srv.warned.add(warning)
        log.warning(warning)
    if chat:
        ids = await asyncio.to_thread(srv.encode_chat, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or srv.room(ids, prefix)
    else:
        ids = await asyncio.to_thread(srv.encode, body.prompt)
        max_tokens = body.max_tokens
    capacity = len(ids) * body.n * (max_tokens + 1) + 2  # every event this request can produce
    work = Work(
        "generate",
        prefix,
        ids,
        Sink(asyncio.get_running_loop(), capacity),
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=tuple(body.stop or ()),
    )
    transcript = srv.submit(work, prefix)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if body.stream:
        await transcript.wait(request, first=True)  # an early failure gets its HTTP status
        usage = bool(body.stream_options and body.stream_options.include_usage)
        head = _head(ident, "chat.completion.chunk" if chat else "text_completion", body.model)
        return EventStream(_stream(transcript, head, chat, usage), srv.settings.send_timeout_s)
    await transcript.wait(request)
    if transcript.error is not None:
        raise transcript.error
    head = _head(ident, "chat.completion" if chat else "text_completion", body.model)
    choices = []
    for i, c in enumerate(transcript.choices):
        out = {"message": {"role": "assistant", "content": c.text()}} if chat else {"text": c.text()}
        choices.append({"index": i, **out, "logprobs": None, "finish_reason": c.finish})
    return JSONResponse({**head, "choices": choices, "usage": transcript.usage()})


async def _stream(transcript: Transcript, head: dict, chat: bool, usage: bool) -> AsyncIterator[str]:
    """The events of a streamed answer: a chunk per choice that changed, usage if asked, then [DONE]."""

    def chunk(i: int, text: str | None, finish: str | None) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    try:
        if chat:
            for i in range(len(transcript.choices)):
                yield chunk(i, None, None)
        changed = range(len(transcript.choices))
        while True:
            for i in changed:
                c = transcript.choices[i]
                text = c.delta()
                if text or c.finish:
                    yield chunk(i, text, c.finish)
            if transcript.error is not None:
                raise transcript.error
            if transcript.complete:
                break
            changed = transcript.feed(await transcript.next_events())
        if usage:
            yield sse({**head, "choices": [], "usage": transcript.usage()})
        yield sse("[DONE]")
    except RequestError as err:
        yield sse(error_body(err))
    finally:
        transcript.work.cancelled = True


async def classify(srv: PrefixServer, request: Request, body: ClassifyRequest) -> dict:
    prefix = await srv.lookup(body.model, "classify")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise RequestError(400, "input is empty")
    ids = await asyncio.to_thread(srv.encode, texts)
    work = Work("classify", prefix, ids, Sink(asyncio.get_running_loop(), 4))
    transcript = srv.submit(work, prefix)
    await transcript.wait(request)
    id2label = getattr(srv.bank.base_model.config, "id2label", None) or {}
    data = []
    for i, probs in enumerate(transcript.result):
        labels = [str(id2label.get(j, id2label.get(str(j), f"LABEL_{j}"))) for j in range(len(probs))]
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append({"index": i, "label": labels[best], "probabilities": dict(zip(labels, probs, strict=True))})
    tokens = sum(len(p) for p in ids)
    return {
        "object": "list",
        "model": body.model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
