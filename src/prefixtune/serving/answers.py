"""What the endpoints answer: /v1/completions and /v1/chat/completions (text, whole or streamed), and
/v1/classify (label probabilities per input).

A request is tokenised, checked and queued (`PrefixServer.submit`), then answered in one of OpenAI's
two shapes: a JSON body once every choice has finished, or server-sent events as tokens arrive
(`stream`). A streamed request waits for its first events before answering, so a request that fails
at once still gets its proper HTTP status instead of an error inside a 200 stream.

/v1/classify is not an OpenAI endpoint; it follows their conventions (a `model` field naming the
prefix, a list of `data`, `usage`) and reports labels by the names in the base model's config (id2label).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from prefixtune.serving.errors import RequestError, error_body
from prefixtune.serving.schemas import ChatRequest, ClassifyRequest, CompletionRequest
from prefixtune.serving.server import PrefixServer
from prefixtune.serving.transcript import Transcript
from prefixtune.serving.work import Sink, Work

log = logging.getLogger("prefixtune.server")


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
