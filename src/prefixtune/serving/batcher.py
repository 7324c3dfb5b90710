"""Dynamic batching: one worker thread owns the model and runs mixed-prefix batches.

Why one thread: a model on one device runs one batch at a time anyway. Giving it a single owner means
no locks around the model, prefix changes (hot-loading) happen between batches, and the event loop
only ever enqueues work and reads results (see `work.py` for that hand-over).

If a batched call raises, its requests are rerun one by one, so only the request that really fails
gets an error and every other in-flight request still gets its answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefixtune.errors import PrefixTuneError
from prefixtune.serving.engine import Engine
from prefixtune.serving.limits import Overloaded, RequestError
from prefixtune.serving.work import Work

log = logging.getLogger("prefixtune.server")


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
            steps = self._run_group(group, split=True)
            # Every row of a `generate` call takes every step, finished or not: how much of that made tokens.
            self.stats["decode_steps"] += steps
            self.stats["row_steps"] += rows * steps

    def _run_group(self, group: list[Work], split: bool) -> int:
        try:
            return self.engine.run(group)
        except Exception as exc:  # noqa: BLE001 - isolate the failing request, keep the others
            if split and len(group) > 1:
                self.stats["reruns"] += 1
                log.warning(
                    "a batch of %d requests failed (%s: %s); rerunning them one by one",
                    len(group),
                    type(exc).__name__,
                    exc,
                )
                steps = 0
                for w in group:
                    if w.closed:
                        continue
                    if w.sampled and any(w.tokens):  # sampled text cannot be resumed faithfully
                        w.fail(exc)
                    else:
                        steps += self._run_group([w], split=False)
                return steps
            log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=not isinstance(exc, RequestError))
            for w in group:
                if not w.closed:
                    self.stats["failed"] += 1
                w.fail(exc)
            return 0
