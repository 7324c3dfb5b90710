"""Continuous batching for decoders: the running batch is re-formed at every decoding step.

Why: the dynamic batcher (`batcher.py`) runs a group with `generate` to the end of its longest row,
so a request that arrives meanwhile waits for the whole group and a short row waits for the longest.
Here a request joins the running batch as soon as its prompt is in the cache, and a finished row
leaves at once (iteration-level scheduling, as in Orca and vLLM). Each row keeps its own prefix,
sampling settings and stop rules.

Why not transformers' own continuous-batching engine: it runs only its stock attention functions
(sdpa, paged eager, flash), so prefixtune's registered function can enter it only through its
private request bookkeeping, and its block sharing keys cache blocks by token ids alone, which
would share keys/values between rows with different prefixes. So this drives the model's own
forward with a `DynamicCache` whose rows are added (left-padded to one length) and dropped in place
(`growing_cache.py`); the prefixes enter through the same `PrefixState` a mixed batch uses, built
from each prefix's keys/values computed once and shared by every row that names it.

Each iteration: run jobs (prefix loading) and classification requests (one forward, batched as
before), then one decoding step for every running row in which the short prompts of joining rows
ride (`core/ragged.py`: their tokens packed with the running rows' next ones). A prompt longer than
`prefill_chunk` (or one whose prefix is not in the cache, or any prompt when no row is running) is fed
in forwards of its own, at most `prefill_chunk` tokens per iteration, so it never stalls the running
rows for long.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from prefixtune.core import attention
from prefixtune.core.batching import PrefixInputs
from prefixtune.serving.batcher import Batcher, Job
from prefixtune.serving.engine import Engine, deliver
from prefixtune.serving.limits import RequestError
from prefixtune.serving.running_batch import Row, RunningBatch, pick
from prefixtune.serving.work import Work

log = logging.getLogger("prefixtune.server")

# Generation-config fields that would make `generate` pick other tokens than plain argmax/sampling.
_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
               "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
               "sequence_bias", "encoder_repetition_penalty")  # fmt: skip
_NEUTRAL = (None, 0, 1.0, [], False)


def unsupported(engine: Engine) -> str | None:
    """Why continuous batching cannot serve this model, or None when it can."""
    model = engine.bank.base_model
    if engine.task != "causal_lm":
        return f"the model is a {engine.task} model, not a decoder"
    kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"its layers use {sorted(kinds)} attention; the scheduler's cache holds full attention only"
    config = engine.generation_config
    used = [k for k in _PROCESSORS if getattr(config, k, None) not in _NEUTRAL]
    if used:
        return f"its generation config sets {used}, which the scheduler does not apply"
    return None


class ContinuousBatcher(Batcher):
    """The batcher's queue, jobs and limits, with iteration-level scheduling of decoder requests.

    `max_batch_size` bounds the running rows; `max_cache_tokens` bounds the cache (rows x the longest
    row's prompt + prefix + max_tokens); requests beyond either wait in the queue, and a full queue
    still answers 503. `prefill_chunk` bounds the prompt tokens fed per iteration."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, max_queue: int = 1024,
                 max_cache_tokens: int = 32768, prefill_chunk: int = 256, prefix_cache: int = 256):  # fmt: skip
        super().__init__(engine, max_batch_size, 0.0, max_queue)
        self.batch = RunningBatch(engine.bank.base_model, {})  # its slots come with the first prefix
        self.max_cache_tokens = max_cache_tokens
        self.prefill_chunk = prefill_chunk
        self.joining: collections.deque[Row] = collections.deque()
        self.backlog: collections.deque[Work] = collections.deque()
        self.prefix_cache_size = prefix_cache
        self._inputs: collections.OrderedDict[str, tuple[Any, PrefixInputs]] = collections.OrderedDict()
        self.top_k = getattr(engine.generation_config, "top_k", None)
        self.ragged = True  # short prompts ride in the decoding step (`core/ragged.py`) where the model allows

    # ------------------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while not self._stopping.is_set():
            busy = bool(self.joining or self.batch.rows)
            classify = self._take(wait=0.0 if busy or self.backlog else 0.25)
            if classify:
                self._run_batch(classify)
            try:
                self._admit()
                joiners = self._riders()
                self._prefill()
                self._decode(joiners)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything one step does
                self._recover(exc)

    def _take(self, wait: float) -> list[Work]:
        """Everything queued now (waiting up to `wait` for a first item): jobs run, requests are held."""
        classify: list[Work] = []
        item = self._carry.popleft() if self._carry else self._get(wait)
        while item is not None:
            if isinstance(item, Job):
                item.run()
            elif isinstance(item, Work):
                if item.kind == "generate":
                    self.backlog.append(item)
                else:
                    with self._count_lock:
                        self._waiting -= 1
                    classify.append(item)
            item = self._carry.popleft() if self._carry else self._get(0)
        return classify

    def _prefix_inputs(self, name: str | None) -> PrefixInputs | None:
        """A prefix's keys/values, computed once per loaded prefix and shared by its rows (LRU-bounded)."""
        if name is None:
            return None
        member = self.engine.member(name)
        cached = self._inputs.get(name)
        if cached is None or cached[0] is not member:
            with torch.no_grad():
                cached = (member, member.inputs())
            for gone in [n for n in self._inputs if n not in self.engine.bank]:
                del self._inputs[gone]  # unloaded or removed prefixes: their rows keep their own reference
            self._inputs[name] = cached
            self.batch.slots = member.slots  # the same attention modules for every prefix of this model
            while len(self._inputs) > self.prefix_cache_size:
                self._inputs.popitem(last=False)
        self._inputs.move_to_end(name)
        return cached[1]

    def _rows_of(self, work: Work) -> list[Row]:
        inputs = self._prefix_inputs(work.prefix)
        return [Row(work, choices, ids, inputs) for ids, choices in work.row_choices()]

    def _admit(self) -> None:
        """Move queued requests into the joining rows while rows and cache room allow, oldest first."""
        while self.backlog:
            work = self.backlog[0]
            if work.cancelled or work.closed:
                self.backlog.popleft()
                self._taken()
                self.stats["cancelled"] += work.cancelled  # dropped before it cost a step
                continue
            try:
                rows = self._rows_of(work)
            except Exception as exc:  # noqa: BLE001 - an unknown or broken prefix fails its request only
                self.backlog.popleft()
                self._taken()
                self._fail(work, exc)
                continue
            running = [*self.batch.rows, *self.joining]
            count = len(running) + len(rows)
            widest = max(r.reserved for r in [*running, *rows])
            if running and (count > self.max_batch_size or count * widest > self.max_cache_tokens):
                return
            self.backlog.popleft()
            self._taken()
            self.joining.extend(rows)
            self.stats["requests"] += 1

    def _taken(self) -> None:
        with self._count_lock:
            self._waiting -= 1

    def _prefill(self) -> None:
        """Feed up to `prefill_chunk` prompt tokens of the joining rows, oldest first: short prompts
        together in one forward, a longer one alone in chunks over several iterations."""
        budget = self.prefill_chunk
        while self.joining and budget > 0:
            head = self.joining[0]
            if head.work.cancelled or head.work.closed:
                self.joining.popleft()
            elif head.fed or head.alone or len(head.prompt) > self.prefill_chunk:
                budget = self._feed_alone(head, budget)
            elif len(head.prompt) > budget:
                return  # it fits a later iteration's budget whole
            else:
                group = self._pop_fresh(budget)
                budget -= sum(len(row.prompt) for row in group)
                self._join_group(group)

    def _riders(self) -> list[Row]:
        """Joining rows whose whole prompts can ride in this iteration's decoding step, oldest first: short,
        with no prefix or one whose keys/values sit in the cache, while rows are running to ride with."""
        config = self.engine.bank.base_model.config
        own = str(getattr(config, "_attn_implementation", "")).startswith(attention.NAME_PREFIX)
        if not (self.ragged and own and self.batch.rows and self.batch.state is None):
            return []
        return self._pop_fresh(self.prefill_chunk, lambda row: row.inputs is None or row.in_cache)

    def _pop_fresh(self, budget: int, fits: Callable[[Row], bool] = lambda row: True) -> list[Row]:
        """The fresh rows at the head of the queue whose prompts fit `budget` tokens together (and `fits`)."""
        rows: list[Row] = []
        while self.joining and self._fresh(head := self.joining[0]) and len(head.prompt) <= budget and fits(head):
            rows.append(self.joining.popleft())
            budget -= len(head.prompt)
        return rows

    def _fresh(self, row: Row) -> bool:
        """A short prompt not fed yet, which can share a prefill forward with others."""
        return not (row.fed or row.alone or len(row.prompt) > self.prefill_chunk or row.work.closed)

    def _join_group(self, rows: list[Row]) -> None:
        self._count_prefill(len(rows))
        try:
            logits, cache, mask = self.batch.prefill(rows)
        except Exception:  # noqa: BLE001 - find the row at fault: each is fed again alone
            for row in reversed(rows):
                row.fed, row.alone = 0, True
                self.joining.appendleft(row)
            return
        self._joined(rows, logits, cache, mask)

    def _count_prefill(self, rows: int) -> None:
        """A forward of prompts only (not riding in a decoding step), and the rows it fed."""
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += rows

    def _feed_alone(self, row: Row, budget: int) -> int:
        self._count_prefill(1)
        before = row.fed
        try:
            logits = self.batch.feed(row, budget)
        except Exception as exc:  # noqa: BLE001 - a row's own prompt or prefix failing fails its request only
            self.joining.popleft()
            self._fail(row.work, exc)
            return budget
        if logits is not None:
            self.joining.popleft()
            cache, row.cache = row.cache, None
            self._joined([row], logits[None], cache, torch.ones(1, row.fed, dtype=torch.long, device=logits.device))
        return budget - (row.fed - before)

    def _joined(self, rows: list[Row], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Hand fed rows their first token; those not finished by it join the running batch."""
        keep = []
        for i, row in enumerate(rows):
            row.token = pick(logits[i], row.work, self.top_k)
            if not deliver(row.work, row.choices, row.token, self.engine.eos, self.engine.decode):
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=mask.device))
            mask = mask[keep]
        if self.batch.rows:
            self.stats["joined_running"] += len(keep)  # joined a batch that was already decoding
        try:
            self.batch.add([rows[i] for i in keep], cache, mask)
        except Exception as exc:  # noqa: BLE001 - the rows that could not join fail; the batch goes on
            for i in keep:
                self._fail(rows[i].work, exc)

    def _recover(self, exc: Exception) -> None:
        """After a failed shared step: each row is fed again alone, so a row that fails by itself fails
        alone; a row already re-fed once is answered with the error (a step failing for every batch)."""
        log.warning("a decoding step of %d rows failed (%s: %s); feeding them again one by one",
                    len(self.batch.rows), type(exc).__name__, exc)  # fmt: skip
        self.stats["reruns"] += 1
        again = []
        for row in self.batch.rows:
            if row.retried:
                self._fail(row.work, exc)
            else:
                again.append(row.refed())
        self.batch.keep([])
        self.joining.extendleft(reversed(again))

    def _fail(self, work: Work, exc: Exception) -> None:
        if not work.closed:
            self.stats["failed"] += 1
            log.error("request failed: %s: %s", type(exc).__name__, exc)
        work.fail(exc)

    def _decode(self, joiners: list[Row]) -> None:
        batch = self.batch
        live = [i for i, r in enumerate(batch.rows) if not (r.work.cancelled or r.work.closed)]
        batch.keep(live)
        if not batch.rows:
            self.joining.extendleft(reversed(joiners))  # nothing to ride with: fed the usual way
            return
        try:
            logits = batch.step(joiners)
        except Exception:
            if joiners:  # the usual way from now on: a model the ragged step cannot serve fails once only
                log.warning("a ragged step failed; prompts are fed in forwards of their own from now on")
                self.ragged = False
                self.joining.extendleft(reversed(joiners))
            raise
        self.stats["steps"] += 1
        self.stats["rows"] += len(batch.rows)
        self.stats["joined_running"] += len(joiners)
        self.stats["rode"] += len(joiners)  # prompts fed inside the decoding step
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch.rows))
        keep = []
        for i, row in enumerate(batch.rows):
            row.token = pick(logits[i], row.work, self.top_k)
            if not deliver(row.work, row.choices, row.token, self.engine.eos, self.engine.decode):
                keep.append(i)
        batch.keep(keep)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        rows = [*self.batch.rows, *self.joining]
        for work in [*self.backlog, *(r.work for r in rows)]:
            work.fail(RequestError(503, "server shutting down", "server_error"))
