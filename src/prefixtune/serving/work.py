"""One request as the worker thread sees it (`Work`), and the channel its results travel back by (`Sink`).

The worker never waits on a client: results go into a bounded `Sink` per request with non-blocking
puts, and a request whose client left or timed out is marked cancelled by its handler and drops out
of its batch at the next decoding step. Everything a handler and the worker share is on these two
objects, so that hand-over is the only place the event loop and the worker thread meet.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prefixtune.serving.errors import RequestError

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
