"""One request's results as its handler sees them: events from the worker folded into text or a result.

The worker sends raw token ids; `ChoiceText` turns them into text that is safe to send, holding back
what could still become a stop string or is half a UTF-8 character. `Transcript` waits for those
events within the request's deadline and cancels the request when the deadline passes or the client
disconnects, so an abandoned request drops out of its batch instead of running to the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from prefixtune.serving.errors import RequestError
from prefixtune.serving.work import Work


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
