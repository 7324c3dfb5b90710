"""An OpenAI-compatible HTTP server for many prefixes on one frozen model (`prefixtune serve`).

The `model` field of a request names the prefix; the base model's own id means no prefix. Requests
that arrive together share one mixed-prefix batch (`batcher.py`). Prefixes live in a folder, one
subfolder per prefix named like it, and appear without a restart: the folder is polled, and a
request naming a subfolder not loaded yet loads it first.

Endpoints:
- POST /v1/completions, /v1/chat/completions: max_tokens, temperature (0: greedy), top_p, stop, n,
  stream (server-sent events), stream_options.include_usage. Unsupported OpenAI fields are refused
  (422) rather than silently ignored.
- POST /v1/classify: {"model", "input": str | [str]} -> label and probabilities per input, with the
  label names of the base model's config (id2label).
- GET /v1/models, /v1/models/{id}, /health.
- POST /admin/prefixes/{name}[?replace=true] with a JSON body {"config": <the prefixtune_config.json
  object>, "weights": <base64 of prefixtune_model.safetensors>}; DELETE /admin/prefixes/{name}.
  Both need `Authorization: Bearer <admin token>`; with no token configured they are disabled.
  An upload is loaded (validated) before it becomes visible and is moved into the folder atomically.

Every error has OpenAI's shape {"error": {"message", "type", "code"}}: 400 over a limit, 404 unknown
model, 413 body too large, 422 malformed, 500 a failure inside generation (only that request's),
503 queue full, 504 timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h11
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from prefixtune import serialization, tasks
from prefixtune.assets import resolve_model
from prefixtune.batcher import Batcher, Engine, RequestError, Sink, Work
from prefixtune.collection import PrefixCollection
from prefixtune.errors import PrefixTuneError
from prefixtune.model import PrefixModel

log = logging.getLogger("prefixtune.server")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")
MAX_N = 16
MAX_STOP = 4
# OpenAI options this server does not implement, with the values that make them no-ops: many clients
# send those by default. Any other value is refused (422) rather than silently ignored.
NEUTRAL = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "best_of": (1,),
    "logit_bias": ({},),
    "parallel_tool_calls": (False, True),
}


@dataclass
class Settings:
    """Limits of one server instance; each one bounds the memory or time a single request can take."""

    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 512
    admin_token: str | None = None
    reload_interval_s: float | None = 2.0
    request_timeout_s: float = 300.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    max_queue: int = 1024


# ------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """An explicit null means the default, and no-op values of unimplemented options are accepted."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None and not (k in NEUTRAL and v in NEUTRAL[k])}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > 256 for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings of at most 256 characters")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content} | ({"name": self.name} if self.name else {})


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ClassifyRequest(_Body):
    model: str
    input: str | list[str]


class UploadRequest(_Body):
    config: dict[str, Any]
    weights: str = Field(description="base64 of the prefixtune_model.safetensors file")


# ------------------------------------------------------------------------------------- the prefix folder
def _signature(folder: Path) -> tuple | None:
    """What changes when a prefix folder is rewritten (atomic renames give new inodes)."""
    stats = []
    for name in (serialization.CONFIG_NAME, serialization.WEIGHTS_NAME):
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            if name == serialization.CONFIG_NAME:
                return None  # config is written last: without it the prefix is not complete yet
            stats.append(None)
            continue
        stats.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stats)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class PrefixFolder:
    """The prefixes directory as the source of truth. All methods run on the batcher's worker thread,
    so loading never races a batch and the collection only changes between batches."""

    def __init__(self, root: str | Path, bank: PrefixCollection, reserved: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bank = bank
        self.reserved = reserved
        self.seen: dict[str, tuple] = {}
        self.errors: dict[str, str] = {}
        for leftover in self.root.glob(".upload-*"):  # from a crash during an upload or delete
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(".trash-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _scan(self) -> dict[str, tuple]:
        found = {}
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if not NAME_RE.fullmatch(entry.name) or entry.name == self.reserved:
                self.errors[entry.name] = "not a valid prefix name (letters, digits, '_' and '-'; not the base id)"
                continue
            sig = _signature(Path(entry.path))
            if sig is not None:
                found[entry.name] = sig
        return found

    def sync(self) -> None:
        """Load new or changed subfolders and drop removed ones. A broken folder is reported in
        `errors` and not retried until it changes; a loaded version keeps serving meanwhile."""
        present = self._scan()
        self.errors = {n: e for n, e in self.errors.items() if (self.root / n).exists()}
        for name in [n for n in self.seen if n not in present]:
            del self.seen[name]
            self.errors.pop(name, None)
            if name in self.bank:
                self.bank.remove(name)
                log.info("prefix %r removed (its folder is gone)", name)
        for name, sig in present.items():
            if self.seen.get(name) == sig:
                continue
            self.seen[name] = sig
            try:
                self.bank.add(name, PrefixModel.from_pretrained(self.bank.base_model, self.root / name))
            except Exception as exc:  # noqa: BLE001 - one bad folder must not stop the others
                self.errors[name] = str(exc)
                log.warning("prefix %r not loaded: %s", name, exc)
            else:
                self.errors.pop(name, None)
                log.info("prefix %r loaded", name)

    def install(self, name: str, record: dict, weights: bytes, replace: bool) -> None:
        """Write an uploaded prefix to a hidden folder, load it, then rename it into place."""
        target = self.root / name
        if not replace and (name in self.bank or target.exists()):
            raise RequestError(409, f"prefix {name!r} already exists; pass ?replace=true to overwrite it")
        record = {"format_version": serialization.FORMAT_VERSION, **record}
        staging = Path(tempfile.mkdtemp(prefix=f".upload-{name}-", dir=self.root))
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
        try:
            serialization.write_bytes(staging / serialization.WEIGHTS_NAME, weights)
            serialization.write_json(staging / serialization.CONFIG_NAME, record)
            try:
                model = PrefixModel.from_pretrained(self.bank.base_model, staging)
            except PrefixTuneError as exc:
                raise RequestError(400, f"invalid prefix: {str(exc).replace(str(staging), name)}") from exc
            if target.exists():
                os.replace(target, trash)
            try:
                os.replace(staging, target)
            except OSError:
                if trash.exists():  # put the previous version back
                    os.replace(trash, target)
                raise
            _fsync_dir(self.root)
            self.bank.add(name, model)
            self.seen[name] = _signature(target) or ()
            self.errors.pop(name, None)
            log.info("prefix %r installed through the admin endpoint", name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)

    def delete(self, name: str) -> None:
        target = self.root / name
        if name not in self.bank and not target.exists():
            raise RequestError(404, f"unknown prefix {name!r}", code="model_not_found")
        if target.exists():
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
            os.replace(target, trash)
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        if name in self.bank:
            self.bank.remove(name)
        self.seen.pop(name, None)
        self.errors.pop(name, None)
        log.info("prefix %r deleted through the admin endpoint", name)


# ------------------------------------------------------------------------------------- results
class ChoiceText:
    """One choice's text as its tokens arrive. Text that could still be the start of a stop string,
    or that ends in an incomplete UTF-8 sequence, is held back until later tokens settle it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self.decode = decode
        self.stop = stop
        self.ids: list[int] = []
        self.finish: str | None = None
        self.sent = 0

    def text(self) -> str:
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(cuts)] if cuts else text

    def delta(self) -> str:
        text = self.text()
        end = len(text)
        if self.finish is None:
            end -= max((len(s) - 1 for s in self.stop), default=0)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent : end], end
        return out


class Transcript:
    """The handler's view of one request: events from the worker folded into choices or a result."""

    def __init__(self, work: Work, decode: Callable[[list[int]], str]):
        self.work = work
        self.choices = [ChoiceText(decode, work.stop) for _ in range(work.choices)]
        self.error: RequestError | None = None
        self.result: Any = None

    def feed(self, events: list) -> list[int]:
        changed = set()
        for event in events:
            if event[0] == "token":
                self.choices[event[1]].ids.append(event[2])
                changed.add(event[1])
            elif event[0] == "finish":
                self.choices[event[1]].finish = event[2]
                changed.add(event[1])
            elif event[0] == "result":
                self.result = event[1]
            else:
                self.error = event[1]
        return sorted(changed)

    @property
    def complete(self) -> bool:
        if self.error is not None or self.result is not None:
            return True
        return self.work.kind == "generate" and all(c.finish for c in self.choices)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.work.prompts)
        completion = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_body(err: RequestError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


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


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------------------------- the server
def load_base(name: str, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any, str]:
    """The frozen base model, its tokenizer and task. A saved classifier keeps its head and labels,
    since classification prefixes are trained against them; never remote code."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as exc:
        raise PrefixTuneError(f"cannot load model {name!r}: {(str(exc).strip().splitlines() or [''])[0]}") from None
    if any("SequenceClassification" in a for a in getattr(config, "architectures", None) or []):
        labels = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
        model, tokenizer, task = tasks.load_model(name, "classification", config.num_labels, labels)
    else:
        model, tokenizer, task = tasks.load_model(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device, getattr(torch, dtype or "float32")).eval(), tokenizer, task


class PrefixServer:
    """Everything one app owns: model, tokenizer, prefix folder, batcher, limits; and the request logic
    that is not HTTP plumbing (name lookup, tokenisation, limit checks, waiting for results)."""

    def __init__(self, model: Any, tokenizer: Any, task: str, prefixes_dir: str | Path, base_id: str, s: Settings):
        self.settings = s
        self.base_id = base_id
        self.tokenizer = tokenizer
        tokenizer("warm up")  # lets the tokenizer settle any padding/truncation state before threads share it
        self.bank = PrefixCollection(model)
        self.engine = Engine(self.bank, tokenizer, task)
        self.batcher = Batcher(self.engine, s.max_batch_size, s.max_wait_ms, s.max_queue)
        self.folder = PrefixFolder(prefixes_dir, self.bank, base_id)
        self.folder.sync()
        self.vocab = model.get_input_embeddings().num_embeddings
        self.max_positions = tasks.max_positions(model)
        self.created = int(time.time())

    # ------------------------------------------------------------------------------ names
    async def lookup(self, name: str, purpose: str) -> str | None:
        """The prefix a request names (None: the base model), loading a new folder on the way."""
        prefix = await self.find(name)
        task = self.engine.task if prefix is None else self.member(prefix).task
        if purpose == "classify" and task != "classification":
            raise RequestError(400, f"model {name!r} is a {task} model; /v1/classify needs a classification one")
        if purpose == "generate" and task not in ("causal_lm", "seq2seq_lm"):
            hint = "; use /v1/classify" if task == "classification" else ""
            raise RequestError(400, f"model {name!r} is a {task} model and cannot generate text{hint}")
        return prefix

    async def find(self, name: str) -> str | None:
        """Resolve a model id; a subfolder dropped in since the last scan is loaded now, not at the next poll."""
        if name == self.base_id:
            return None
        if name in self.bank:
            return name
        if NAME_RE.fullmatch(name) and (self.folder.root / name / serialization.CONFIG_NAME).is_file():
            await self.batcher.call(self.folder.sync)
            if name in self.bank:
                return name
            if name in self.folder.errors:
                msg = f"prefix {name!r} is in the folder but failed to load: {self.folder.errors[name]}"
                raise RequestError(404, msg, code="model_not_found")
        msg = f"unknown model {name!r}: neither a loaded prefix nor the base model {self.base_id!r}; see /v1/models"
        raise RequestError(404, msg, code="model_not_found")

    def member(self, name: str) -> PrefixModel:
        """A loaded prefix; 404 if it was removed a moment ago (the folder poller, an admin delete)."""
        try:
            return self.bank.members[name]
        except KeyError:
            raise RequestError(404, f"prefix {name!r} was just removed", code="model_not_found") from None

    def card(self, name: str | None) -> dict:
        if name is None:
            return {
                "id": self.base_id,
                "object": "model",
                "created": self.created,
                "owned_by": "prefixtune",
                "parent": None,
                "task": self.engine.task,
            }
        member = self.member(name)
        cfg = member.prefix_config
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "prefixtune",
            "parent": self.base_id,
            "task": member.task,
            "method": cfg.method,
            "num_virtual_tokens": cfg.num_virtual_tokens,
        }

    # ------------------------------------------------------------------------------ inputs and limits
    def encode(self, prompt: str | list, special: bool = True) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        prompts = [
            self.tokenizer(p, add_special_tokens=special)["input_ids"] if isinstance(p, str) else p for p in prompt
        ]
        if not prompts or not all(prompts):
            raise RequestError(400, "the prompt is empty")
        if any(not 0 <= t < self.vocab for p in prompts for t in p):
            raise RequestError(400, f"prompt token ids must be in [0, {self.vocab})")
        return prompts

    def encode_chat(self, messages: list[ChatMessage]) -> list[list[int]]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, "the model's tokenizer has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(
                [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
            raise RequestError(400, f"the chat template refused these messages: {exc}") from exc
        return self.encode(text, special=False)

    def _used(self, prefix: str | None) -> int:
        return 0 if prefix is None else self.member(prefix).positions_used

    def room(self, prompts: list[list[int]], prefix: str | None) -> int:
        """Default max_tokens when a chat request names none: the limit, or what fits the model."""
        limit = self.settings.max_tokens_limit
        if not self.max_positions or self.engine.task != "causal_lm":
            return limit
        return max(1, min(limit, self.max_positions - self._used(prefix) - max(len(p) for p in prompts)))

    def check(self, work: Work, prefix: str | None) -> None:
        s = self.settings
        if work.kind == "generate" and work.max_tokens > s.max_tokens_limit:
            raise RequestError(
                400, f"max_tokens={work.max_tokens} is above this server's limit of {s.max_tokens_limit}"
            )
        if work.rows > s.max_batch_size:
            raise RequestError(
                400,
                f"this request needs {work.rows} batch rows (prompts x n when sampling); the limit is "
                f"max_batch_size={s.max_batch_size}",
            )
        used = self._used(prefix)
        for ids in work.prompts:
            if len(ids) > s.max_prompt_tokens:
                raise RequestError(
                    400,
                    f"the prompt has {len(ids)} tokens; the limit is {s.max_prompt_tokens}",
                    code="context_length_exceeded",
                )
            need = len(ids) + used + (work.max_tokens if self.engine.task == "causal_lm" else 0)
            if self.max_positions and need > self.max_positions:
                raise RequestError(
                    400,
                    f"prompt ({len(ids)} tokens) + prefix ({used}) + max_tokens ({work.max_tokens}) = {need} "
                    f"exceeds the model's {self.max_positions} positions",
                    code="context_length_exceeded",
                )

    # ------------------------------------------------------------------------------ running requests
    def submit(self, work: Work, prefix: str | None) -> tuple[Transcript, float]:
        self.check(work, prefix)
        self.batcher.submit(work)
        return Transcript(work, self.engine.decode), time.monotonic() + self.settings.request_timeout_s

    async def next_events(self, work: Work, deadline: float) -> list:
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            return await work.sink.get(remaining)
        except TimeoutError:
            work.cancelled = True
            timeout = self.settings.request_timeout_s
            raise RequestError(504, f"the request timed out after {timeout:g} s", "server_error", "timeout") from None

    async def wait(self, transcript: Transcript, request: Request, deadline: float, first: bool = False) -> None:
        """Wait until the result is complete (`first`: until the first events); raise its error, if any.

        A client that disconnects meanwhile cancels its request: it drops out of its batch.
        """
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not transcript.complete:
                step = asyncio.ensure_future(self.next_events(transcript.work, deadline))
                await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    raise RequestError(499, "the client closed the request", code="client_closed")
                transcript.feed(step.result())
                if first:
                    break
        except BaseException:
            transcript.work.cancelled = True
            raise
        finally:
            gone.cancel()
        if transcript.error is not None and not any(c.ids for c in transcript.choices):
            raise transcript.error

    async def generate(self, request: Request, body: CompletionRequest | ChatRequest) -> Response:
        chat = isinstance(body, ChatRequest)
        prefix = await self.lookup(body.model, "generate")
        if chat:
            prompts = await asyncio.to_thread(self.encode_chat, body.messages)
            max_tokens = body.max_completion_tokens or body.max_tokens or self.room(prompts, prefix)
        else:
            prompts = await asyncio.to_thread(self.encode, body.prompt)
            max_tokens = body.max_tokens
        capacity = len(prompts) * body.n * (max_tokens + 1) + 2  # every event this request can produce
        work = Work(
            "generate",
            prefix,
            prompts,
            Sink(asyncio.get_running_loop(), capacity),
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            n=body.n,
            stop=tuple(body.stop or ()),
        )
        transcript, deadline = self.submit(work, prefix)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            await self.wait(transcript, request, deadline, first=True)  # an early failure gets its HTTP status
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(
                self._stream(transcript, deadline, ident, body.model, chat, usage), self.settings.send_timeout_s
            )
        await self.wait(transcript, request, deadline)
        if transcript.error is not None:
            raise transcript.error
        head = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        choices = []
        for i, c in enumerate(transcript.choices):
            out = {"message": {"role": "assistant", "content": c.text()}} if chat else {"text": c.text()}
            choices.append({"index": i, **out, "logprobs": None, "finish_reason": c.finish})
        return JSONResponse({**head, "choices": choices, "usage": transcript.usage()})

    async def _stream(
        self, transcript: Transcript, deadline: float, ident: str, model: str, chat: bool, usage: bool
    ) -> AsyncIterator[str]:
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

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
                changed = transcript.feed(await self.next_events(transcript.work, deadline))
            if usage:
                yield sse({**head, "choices": [], "usage": transcript.usage()})
            yield sse("[DONE]")
        except RequestError as err:
            yield sse(error_body(err))
        finally:
            transcript.work.cancelled = True

    async def classify(self, request: Request, body: ClassifyRequest) -> dict:
        prefix = await self.lookup(body.model, "classify")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise RequestError(400, "input is empty")
        prompts = await asyncio.to_thread(self.encode, texts)
        work = Work("classify", prefix, prompts, Sink(asyncio.get_running_loop(), 4))
        transcript, deadline = self.submit(work, prefix)
        await self.wait(transcript, request, deadline)
        id2label = getattr(self.bank.base_model.config, "id2label", None) or {}
        data = []
        for i, probs in enumerate(transcript.result):
            labels = [str(id2label.get(j, id2label.get(str(j), f"LABEL_{j}"))) for j in range(len(probs))]
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": labels[best], "probabilities": dict(zip(labels, probs, strict=True))})
        tokens = sum(len(p) for p in prompts)
        return {
            "object": "list",
            "model": body.model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ------------------------------------------------------------------------------ admin
    def admin_error(self, headers: Mapping[str, str]) -> RequestError | None:
        """Why a request may not use the admin endpoints (None: it may). Constant-time comparison."""
        token = self.settings.admin_token
        if not token:
            return RequestError(
                403, "admin endpoints are disabled: start the server with an admin token", "permission_error"
            )
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return RequestError(
                401,
                "missing admin token: send 'Authorization: Bearer <token>'",
                "authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return RequestError(403, "wrong admin token", "permission_error")
        return None

    def check_name(self, name: str) -> None:
        if not NAME_RE.fullmatch(name) or name == self.base_id:
            raise RequestError(
                400,
                f"invalid prefix name {name!r}: 1-128 letters, digits, '_' or '-', "
                "starting with a letter or digit, and not the base model's id",
            )

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self.batcher.call(self.folder.sync)
            except Exception:  # noqa: BLE001 - keep polling after a failed scan (e.g. folder briefly gone)
                log.exception("scanning the prefix folder failed")


# ------------------------------------------------------------------------------------- HTTP plumbing
class BodyLimit:
    """Pure ASGI guard, before any handler buffers a body: refuse bodies over the limit (declared
    Content-Length, then bytes actually received) with 413, bodies not received within
    `body_timeout_s` with 408, and admin requests without the right token before reading them."""

    def __init__(self, app: Any, server: PrefixServer):
        self.app = app
        self.server = server

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.server.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = s.max_body_bytes
        if scope["path"].startswith("/admin/"):
            err = self.server.admin_error(headers)
            if err is not None:
                return await self._refuse(send, receive, err, limit)
            limit = s.max_upload_bytes
        too_large = RequestError(413, f"request body larger than {limit} bytes", code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._refuse(send, receive, RequestError(400, "invalid Content-Length"), 0)
            if int(declared) > limit:
                return await self._refuse(send, receive, too_large, int(declared))
        chunks, size = [], 0
        deadline = time.monotonic() + s.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                err = RequestError(408, f"the request body was not received within {s.body_timeout_s:g} s")
                return await self._send(send, err)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(send, receive, too_large, 4 * limit, more=message.get("more_body", False))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(
        self, send: Callable, receive: Callable, err: RequestError, drain: int, more: bool = True
    ) -> None:
        """Answer `err`, first reading (and dropping) a body of up to 4x the limit, so the client gets to
        read the answer instead of a reset connection from a server that closed while it was writing."""
        budget = min(drain, 4 * max(self.server.settings.max_body_bytes, 1 << 16))
        deadline = time.monotonic() + self.server.settings.body_timeout_s
        with contextlib.suppress(TimeoutError):
            while more and budget > 0:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
                if message["type"] == "http.disconnect":
                    return
                budget -= len(message.get("body", b""))
                more = message.get("more_body", False)
        await self._send(send, err)

    @staticmethod
    async def _send(send: Callable, err: RequestError) -> None:
        payload = json.dumps(error_body(err)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for a request's headers: `timeout_keep_alive` seconds from
    the connection opening (or the previous response). uvicorn alone closes idle keep-alive connections,
    but a fresh connection that sends nothing, or half its headers, would stay open for ever."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.timeout_keep_alive, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE:
            self.timeout_keep_alive_handler()


def _install_routes(app: FastAPI, srv: PrefixServer) -> None:
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await srv.generate(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await srv.generate(request, body)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> dict:
        return await srv.classify(request, body)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [srv.card(None)] + [srv.card(n) for n in sorted(srv.bank.names())]}

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
            "prefixes": len(srv.bank.names()),
            "queued": srv.batcher.pending(),
            "stats": dict(srv.batcher.stats),
            "prefix_errors": srv.folder.errors,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/admin/prefixes/{name}", status_code=201)
    async def upload(name: str, body: UploadRequest, request: Request, replace: bool = False) -> dict:
        err = srv.admin_error(request.headers)
        if err is not None:
            raise err
        srv.check_name(name)
        try:
            weights = await asyncio.to_thread(base64.b64decode, body.weights, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"weights must be base64: {exc}") from exc
        await srv.batcher.call(lambda: srv.folder.install(name, body.config, weights, replace))
        return srv.card(name)

    @app.delete("/admin/prefixes/{name}")
    async def delete(name: str, request: Request) -> dict:
        err = srv.admin_error(request.headers)
        if err is not None:
            raise err
        srv.check_name(name)
        await srv.batcher.call(lambda: srv.folder.delete(name))
        return {"id": name, "object": "model", "deleted": True}


def create_app(
    model_path_or_name: str,
    prefixes_dir: str | Path,
    *,
    max_batch_size: int = 8,
    max_wait_ms: float = 10.0,
    max_body_bytes: int = 1 << 20,
    max_upload_bytes: int = 64 << 20,
    max_prompt_tokens: int = 2048,
    max_tokens_limit: int = 512,
    admin_token: str | None = None,
    reload_interval_s: float | None = 2.0,
    request_timeout_s: float = 300.0,
    body_timeout_s: float = 30.0,
    send_timeout_s: float = 30.0,
    max_queue: int = 1024,
    served_model_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    num_threads: int | None = None,
) -> FastAPI:
    """Load the base model and every prefix in `prefixes_dir`, and return the FastAPI app serving them.

    The app's worker thread starts with the app's lifespan (uvicorn runs it). `reload_interval_s` None
    or 0 turns folder polling off (a request naming a new subfolder still loads it).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    settings = Settings(
        max_batch_size,
        max_wait_ms,
        max_body_bytes,
        max_upload_bytes,
        max_prompt_tokens,
        max_tokens_limit,
        admin_token or None,
        reload_interval_s,
        request_timeout_s,
        body_timeout_s,
        send_timeout_s,
        max_queue,
    )
    model, tokenizer, task = load_base(model_path_or_name, device, dtype)
    base_id = served_model_name or (
        Path(model_path_or_name).name if os.sep in model_path_or_name else model_path_or_name
    )
    srv = PrefixServer(model, tokenizer, task, prefixes_dir, base_id, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        srv.batcher.start()
        poller = asyncio.create_task(srv.poll()) if reload_interval_s else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            await asyncio.to_thread(srv.batcher.stop)

    app = FastAPI(title="prefixtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.prefixtune = srv
    _install_routes(app, srv)
    app.add_middleware(BodyLimit, server=srv)
    return app


# ------------------------------------------------------------------------------------- running it
def uvicorn_config(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    timeout_keep_alive: int = 5,
    max_connections: int = 1024,
    log_level: str = "info",
) -> uvicorn.Config:
    """The uvicorn settings `serve` uses: short keep-alive, header deadline, bounded connections."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=HeaderTimeoutH11Protocol,
        ws="none",
        lifespan="on",
        timeout_keep_alive=timeout_keep_alive,
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=10,
        log_level=log_level,
    )


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **options: Any) -> Iterator[str]:
    """Serve `app` from a background thread with `serve`'s settings and yield its base URL; port 0
    picks a free one. For tests, benchmarks and notebooks; `serve` is the way to run a server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, host, sock.getsockname()[1], **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="prefixtune-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        if not server.started:
            raise RuntimeError("the server did not start")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve(
    model_path_or_name: str,
    prefixes_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    timeout_keep_alive: int = 5,
    max_connections: int = 1024,
    log_level: str = "info",
    **app_options: Any,
) -> None:
    """Build the app and run it with uvicorn until interrupted."""
    app = create_app(model_path_or_name, prefixes_dir, **app_options)
    config = uvicorn_config(
        app, host, port, timeout_keep_alive=timeout_keep_alive, max_connections=max_connections, log_level=log_level
    )
    uvicorn.Server(config).run()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `prefixtune serve` (shared with `python -m prefixtune.server`)."""
    d = Settings()
    a = parser.add_argument
    a("--model", required=True, help="base model: a folder, a hub name, or a built-in alias (smollm2, minilm)")
    a("--prefixes", required=True, help="folder with one subfolder per prefix (created if missing); watched")
    a("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    a("--port", type=int, default=8000, help="port (default: %(default)s)")
    a(
        "--admin-token",
        default=os.environ.get("PREFIXTUNE_ADMIN_TOKEN"),
        help="token for /admin/prefixes; prefer the PREFIXTUNE_ADMIN_TOKEN variable (command lines are visible "
        "to other users). Without one the admin endpoints are disabled",
    )
    a("--served-model-name", default=None, help="id of the base model in requests (default: the folder's name)")
    a("--max-batch-size", type=int, default=d.max_batch_size, help="rows per batch (default: %(default)s)")
    a("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a request waits for others to batch with")
    a("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (default: %(default)s)")
    a("--max-upload-bytes", type=int, default=d.max_upload_bytes, help="largest admin upload (default: %(default)s)")
    a("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest prompt (default: %(default)s)")
    a("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens (default: %(default)s)")
    a(
        "--reload-interval",
        type=float,
        default=d.reload_interval_s,
        dest="reload_interval_s",
        help="seconds between folder scans; 0: off",
    )
    a(
        "--request-timeout",
        type=float,
        default=d.request_timeout_s,
        dest="request_timeout_s",
        help="seconds before a request is abandoned",
    )
    a("--max-queue", type=int, default=d.max_queue, help="queued requests before answering 503")
    a("--timeout-keep-alive", type=int, default=5, help="seconds an idle connection stays open (default: 5)")
    a("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    a("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype (default: float32)")
    a("--threads", type=int, default=None, dest="num_threads", help="torch CPU threads")
    a("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def run_from_args(args: argparse.Namespace | Mapping[str, Any]) -> None:
    """Run `serve` with options from a parser that `add_arguments` filled (a Namespace, or a dict
    from which None values may have been dropped: missing options take their defaults)."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    defaults = vars(add_arguments(argparse.ArgumentParser()).parse_args(["--model", "", "--prefixes", ""]))
    options = {k: v if given.get(k) is None else given[k] for k, v in defaults.items()}
    options["reload_interval_s"] = options["reload_interval_s"] or None
    logging.basicConfig(level=options["log_level"].upper(), format="%(levelname)s %(name)s: %(message)s")
    serve(options.pop("model"), options.pop("prefixes"), **options)


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(
        argparse.ArgumentParser(
            prog="prefixtune serve", description="Serve many prefixes of one frozen model over an OpenAI-compatible API"
        )
    )
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except PrefixTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
