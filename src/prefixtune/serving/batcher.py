"""Dynamic batching for the server: one worker thread owns the model and runs mixed-prefix batches.

Why one thread: a model on one device runs one batch at a time anyway. Giving it a single owner means
no locks around the model, prefix changes (hot-loading) happen between batches, and the event loop
only ever enqueues work and reads results. The worker never waits on a client: results go into a
bounded `Sink` per request with non-blocking puts, and a request whose client left or timed out is
marked cancelled and drops out of its batch at the next decoding step.

If a batched call raises, its requests are rerun one by one, so only the request that really fails
gets an error and every other in-flight request still gets its answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from prefixtune.collection import PrefixCollection, UnknownPrefixError
from prefixtune.errors import PrefixTuneError

log = logging.getLogger("prefixtune.server")

Event = tuple  # ("token", choice, id) | ("finish", choice, reason) | ("result", probs) | ("error", RequestError)


class RequestError(Exception):
    """A failure of one request, with the HTTP status and OpenAI error type/code to answer it with."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers

    @classmethod
    def of(cls, exc: BaseException) -> RequestError:
        if isinstance(exc, RequestError):
            return exc
        if isinstance(exc, UnknownPrefixError):
            return cls(404, str(exc), code="model_not_found")
        if isinstance(exc, PrefixTuneError):
            return cls(400, str(exc))
        return cls(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")


class Overloaded(RequestError):
    def __init__(self, depth: int):
        super().__init__(503, f"server overloaded: {depth} requests are already queued; retry later", "server_error")


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


class Router(BaseStreamer, StoppingCriteria):
    """Per-step bookkeeping of one `generate` call, as both its streamer and a stopping criterion.

    As a streamer it receives each step's token batch and hands every row's token to the requests
    sharing that row (n greedy choices share one). As a stopping criterion it tells `generate` which
    rows are finished: EOS, the row's own `max_tokens`, a stop string, or a cancelled request. Both
    hooks may run first for a step (transformers has moved the order), so a step is processed once,
    by whichever sees it first.
    """

    def __init__(self, rows: Sequence[tuple[Work, list[int]]], eos: set[int], decode: Callable[[list[int]], str]):
        self.rows = list(rows)
        self.eos = eos
        self.decode = decode
        self.done = [all(w.finished[c] for c in cs) or w.cancelled for w, cs in self.rows]
        self.start: int | None = None
        self.puts = 0
        self.step = 0

    def put(self, value: torch.Tensor) -> None:
        if self.start is None:  # the first call carries the prompt (or the decoder start tokens)
            self.start = value.shape[-1]
            return
        self.puts += 1
        self._advance(self.puts, value.reshape(-1))

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.start is not None:
            self._advance(input_ids.shape[1] - self.start, input_ids[:, -1])
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _advance(self, step: int, tokens: torch.Tensor) -> None:
        if step <= self.step:
            return
        self.step = step
        for r, (tok, (work, choices)) in enumerate(zip(tokens.tolist(), self.rows, strict=True)):
            if self.done[r]:
                continue
            produced = work.tokens[choices[0]]
            if work.cancelled:
                self.done[r] = True
            elif step <= len(produced):  # a rerun after a failed batch: this token was already sent
                continue
            elif tok in self.eos:
                self._finish(r, "stop")
            else:
                for c in choices:
                    if c != choices[0]:
                        work.tokens[c].append(tok)
                    work.emit(("token", c, tok))
                produced.append(tok)
                if len(produced) >= work.max_tokens:
                    self._finish(r, "length")
                elif work.stop and any(s in self.decode(produced) for s in work.stop):
                    self._finish(r, "stop")

    def _finish(self, row: int, reason: str) -> None:
        work, choices = self.rows[row]
        for c in choices:
            work.finish(c, reason)
        self.done[row] = True

    def close(self) -> None:
        """After `generate` returns: rows still open ran to the call's token limit, i.e. their own."""
        for r in range(len(self.rows)):
            if not self.done[r]:
                self._finish(r, "length")


class Engine:
    """The model side of the worker: turns a group of compatible requests into one model call."""

    def __init__(self, bank: PrefixCollection, tokenizer: Any, task: str):
        self.bank = bank
        self.tokenizer = tokenizer
        self.task = task
        model = bank.base_model
        self.device = next(model.parameters()).device
        self.generation_config = getattr(model, "generation_config", None)
        eos = getattr(self.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.eos, default=0)
        self.left_pad = task == "causal_lm"

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def run(self, group: list[Work]) -> None:
        group = [w for w in group if not w.closed and not w.cancelled]
        for w in group:
            if w.prefix is not None and w.prefix not in self.bank:
                w.fail(UnknownPrefixError(f"prefix {w.prefix!r} was removed before the request ran"))
        group = [w for w in group if not w.closed]
        if group:
            (self._generate if group[0].kind == "generate" else self._classify)(group)

    def _pad(self, prompts: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            cols = slice(width - len(p), width) if left else slice(0, len(p))
            ids[r, cols] = torch.tensor(p, dtype=torch.long)
            mask[r, cols] = 1
        return ids.to(self.device), mask.to(self.device)

    def _config(self, first: Work, max_new_tokens: int) -> Any:
        """The model's own generation config, with the request's sampling settings on top."""
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = max_new_tokens
        config.num_beams = config.num_return_sequences = 1
        config.pad_token_id = self.pad
        if first.sampled:
            config.do_sample, config.temperature, config.top_p = True, first.temperature, first.top_p
        else:
            config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        return config

    def _generate(self, group: list[Work]) -> None:
        rows: list[tuple[Work, list[int]]] = []
        prompts, prefixes = [], []
        for w in group:
            for i, ids in enumerate(w.prompts):
                choices = [i * w.n + j for j in range(w.n)]
                for row_choices in [[c] for c in choices] if w.sampled else [choices]:
                    rows.append((w, row_choices))
                    prompts.append(ids)
                    prefixes.append(w.prefix)
        input_ids, mask = self._pad(prompts, left=self.left_pad)
        router = Router(rows, self.eos, self.decode)
        self.bank.generate(
            prefixes,
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=self._config(group[0], max(w.max_tokens for w in group)),
            streamer=router,
            stopping_criteria=StoppingCriteriaList([router]),
        )
        router.close()

    @torch.no_grad()
    def _classify(self, group: list[Work]) -> None:
        prompts = [p for w in group for p in w.prompts]
        prefixes = [w.prefix for w in group for _ in w.prompts]
        input_ids, mask = self._pad(prompts, left=self.tokenizer.padding_side == "left")
        logits = self.bank(prefixes, input_ids=input_ids, attention_mask=mask).logits.float()
        multi = getattr(self.bank.base_model.config, "problem_type", None) == "multi_label_classification"
        probs = (logits.sigmoid() if multi else logits.softmax(-1)).tolist()
        start = 0
        for w in group:
            w.result(probs[start : start + len(w.prompts)])
            start += len(w.prompts)


@dataclass(eq=False)
class Job:
    """A function to run on the worker thread between batches (prefix loading, admin changes)."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def run(self) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the job
                self.future.set_exception(exc)


class Batcher:
    """Collects requests for up to `max_wait_ms` (from the first one's arrival) or `max_batch_size`
    rows, groups those with compatible sampling settings, and runs each group as one model call."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, max_wait_ms: float = 10.0, max_queue: int = 1024):
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise PrefixTuneError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats: Counter = Counter()
        self._queue: queue.Queue = queue.Queue()
        self._carry: deque = deque()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._waiting = 0  # queued requests, not counting jobs

    # ------------------------------------------------------------------------------ control
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._loop, name="prefixtune-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._queue.put(None)  # wake the worker
        if self._thread is not None:
            self._thread.join(timeout)
        for item in [*self._carry, *iter(lambda: self._get(0), None)]:
            if isinstance(item, Work):
                item.fail(RequestError(503, "server shutting down", "server_error"))
            elif isinstance(item, Job):
                item.future.cancel()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pending(self) -> int:
        """Requests waiting for the worker (jobs such as folder scans are not counted)."""
        return self._waiting

    # ------------------------------------------------------------------------------ entry points
    def submit(self, work: Work) -> None:
        """Queue a request (never blocks); raises `Overloaded` when the queue is full."""
        depth = self.pending()
        if depth >= self.max_queue:
            raise Overloaded(depth)
        self.start()
        work.enqueued = time.monotonic()
        with self._count_lock:
            self._waiting += 1
        self._queue.put(work)

    def run_in_worker(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the worker thread between batches; usable from any thread."""
        job = Job(fn)
        self.start()
        self._queue.put(job)
        return job.future

    async def call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.run_in_worker(fn))

    # ------------------------------------------------------------------------------ the worker
    def _get(self, timeout: float) -> Any:
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _collect(self) -> Job | list[Work] | None:
        """The next job, or the next batch: requests arriving within `max_wait` of the first one's
        arrival, up to `max_batch_size` rows. Jobs met on the way wait until after the batch."""
        item = self._carry.popleft() if self._carry else self._get(0.25)
        if not isinstance(item, Work):
            return item
        batch, rows, deferred = [item], item.rows, []
        deadline = item.enqueued + self.max_wait
        while rows < self.max_batch_size:
            nxt = self._get(deadline - time.monotonic())
            if nxt is None:
                break
            if isinstance(nxt, Work) and rows + nxt.rows <= self.max_batch_size:
                batch.append(nxt)
                rows += nxt.rows
            else:
                deferred.append(nxt)
                if isinstance(nxt, Work):
                    break
        self._carry.extend(deferred)
        with self._count_lock:
            self._waiting -= len(batch)
        return batch

    def _loop(self) -> None:
        while not self._stopping.is_set():
            item = self._collect()
            if isinstance(item, Job):
                item.run()
            elif item:
                try:
                    self._run_batch(item)
                except Exception as exc:  # noqa: BLE001 - the worker must survive anything one batch does
                    log.exception("batch failed outside the model call")
                    for w in item:
                        w.fail(exc)

    def _run_batch(self, works: list[Work]) -> None:
        live = [w for w in works if not w.cancelled]
        self.stats["cancelled"] += len(works) - len(live)
        groups: dict[tuple, list[Work]] = {}
        for w in live:
            groups.setdefault(w.key, []).append(w)
        for group in groups.values():
            rows = sum(w.rows for w in group)
            self.stats["batches"] += 1
            self.stats["rows"] += rows
            self.stats["requests"] += len(group)
            self.stats["max_rows"] = max(self.stats["max_rows"], rows)
            self._run_group(group, split=True)

    def _run_group(self, group: list[Work], split: bool) -> None:
        try:
            self.engine.run(group)
        except Exception as exc:  # noqa: BLE001 - isolate the failing request, keep the others
            if split and len(group) > 1:
                self.stats["reruns"] += 1
                log.warning(
                    "a batch of %d requests failed (%s: %s); rerunning them one by one",
                    len(group),
                    type(exc).__name__,
                    exc,
                )
                for w in group:
                    if w.closed:
                        continue
                    if w.sampled and any(w.tokens):  # sampled text cannot be resumed faithfully
                        w.fail(exc)
                    else:
                        self._run_group([w], split=False)
                return
            log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=not isinstance(exc, RequestError))
            for w in group:
                if not w.closed:
                    self.stats["failed"] += 1
                w.fail(exc)
