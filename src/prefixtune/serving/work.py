"""One request in flight, on both sides of the hand-over between the event loop and the worker thread.

- `Work`: the request as the worker sees it (prompts, sampling settings, tokens so far), and `Sink`,
  the bounded channel its results travel back by. The worker never waits on a client: it puts
  events into the sink without blocking, and a request whose client left or timed out is marked
  cancelled by its handler and drops out of its batch at the next decoding step.
- `Transcript`: the same request as its handler sees it, the sink's events folded into text
  (`ChoiceText`) or a result, waited for within the request's deadline.

Everything a handler and the worker share is on these objects, so this hand-over is the only place
the event loop and the worker thread meet.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefixtune.serving.limits import RequestError

if TYPE_CHECKING:
    from starlette.requests import Request

Event = tuple  # ("token", choice, id) | ("finish", choice, reason) | ("result", probs) | ("error", RequestError)


class Sink:
    """Events from the worker thread to one request's handler on the event loop.

    `push` never blocks: the worker must not wait on a slow client. The capacity is sized from the
    request's own limits (choices x max_tokens), so memory per request is bounded; a push beyond it
    is refused and the request cancelled. Only the first push into an empty sink wakes the loop, so a
    client that stops reading cannot flood the loop with callbacks either.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int):
        self._loop = loop
        self._capacity = capacity
        self._items: deque[Event] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()

    def push(self, event: Event, force: bool = False) -> bool:
        with self._lock:
            if len(self._items) >= self._capacity and not force:
                return False
            self._items.append(event)
            wake = len(self._items) == 1
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return True

    async def get(self, timeout: float) -> list[Event]:
        """Every event queued so far, waiting up to `timeout` seconds for at least one (TimeoutError)."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), timeout)


@dataclass(eq=False)
class Work:
    """One request's rows waiting for the worker: prompts, sampling settings and where results go."""

    kind: str  # "generate" or "classify"
    prefix: str | None
    prompts: list[list[int]]
    sink: Sink
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    cancelled: bool = False  # set by the handler (client gone, timeout); read by the worker
    enqueued: float = field(default_factory=time.monotonic)
    tokens: list[list[int]] = field(init=False)
    finished: list[str | None] = field(init=False)
    closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.tokens = [[] for _ in range(self.choices)]
        self.finished = [None] * self.choices

    @property
    def sampled(self) -> bool:
        return self.kind == "generate" and self.temperature > 0

    @property
    def choices(self) -> int:
        return len(self.prompts) * (self.n if self.kind == "generate" else 1)

    @property
    def rows(self) -> int:
        """Batch rows: sampled choices each need a row, greedy ones share their prompt's row."""
        return self.choices if self.sampled else len(self.prompts)

    def row_choices(self) -> list[tuple[list[int], list[int]]]:
        """(prompt, choices) per batch row: greedy choices of a prompt share a row, sampled ones get one each."""
        out = []
        for i, ids in enumerate(self.prompts):
            choices = [i * self.n + j for j in range(self.n)]
            out += [(ids, [c]) for c in choices] if self.sampled else [(ids, choices)]
        return out

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one model call."""
        if self.kind != "generate":
            return (self.kind,)
        return ("generate", True, self.temperature, self.top_p) if self.sampled else ("generate", False)

    def emit(self, event: Event) -> None:
        if self.closed:
            return
        if not self.sink.push(event):
            self.cancelled = True
            self.fail(RequestError(503, "response queue overflow: the client is not reading", "server_error"))

    def finish(self, choice: int, reason: str) -> None:
        if self.finished[choice] is None:
            self.finished[choice] = reason
            self.emit(("finish", choice, reason))
            self.closed = self.closed or all(f is not None for f in self.finished)

    def result(self, payload: Any) -> None:
        self.emit(("result", payload))
        self.closed = True

    def fail(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed = True
            self.sink.push(("error", RequestError.of(exc)), force=True)


# ------------------------------------------------------------------------------ the handler's side
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


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Transcript:
    """The handler's view of one request: events from the worker folded into choices or a result."""

    def __init__(self, work: Work, decode: Callable[[list[int]], str], timeout_s: float):
        self.work = work
        self.choices = [ChoiceText(decode, work.stop) for _ in range(work.choices)]
        self.error: RequestError | None = None
        self.result: Any = None
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def feed(self, events: list) -> list[int]:
        """Fold `events` in; the indices of the choices they changed."""
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

    async def next_events(self) -> list:
        """The events the worker sent since the last call, waiting for at least one; 504 past the deadline."""
        try:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            return await self.work.sink.get(remaining)
        except TimeoutError:
            self.work.cancelled = True
            raise RequestError(
                504, f"the request timed out after {self.timeout_s:g} s", "server_error", "timeout"
            ) from None

    async def wait(self, request: Request, first: bool = False) -> None:
        """Wait until the result is complete (`first`: until the first events); raise its error, if any.

        A client that disconnects meanwhile cancels its request: it drops out of its batch.
        """
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not self.complete:
                step = asyncio.ensure_future(self.next_events())
                await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    raise RequestError(499, "the client closed the request", code="client_closed")
                self.feed(step.result())
                if first:
                    break
        except BaseException:
            self.work.cancelled = True
            raise
        finally:
            gone.cancel()
        if self.error is not None and not any(c.ids for c in self.choices):
            raise self.error
