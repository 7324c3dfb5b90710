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
forward with a `DynamicCache` whose rows are added (left-padded to one length) and dropped
(`batch_select_indices`); the prefixes enter through the same `PrefixState` a mixed batch uses,
built from each prefix's keys/values computed once and shared by every row that names it.

Each iteration: run jobs (prefix loading) and classification requests (one forward, batched as
before), feed at most `prefill_chunk` prompt tokens of the joining rows (a long prompt is fed over
several iterations, so it never stalls the running rows for long), then one decoding step for
every running row.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from prefixtune.core import attention, batching
from prefixtune.core.batching import PrefixInputs
from prefixtune.serving.batcher import Batcher, Job
from prefixtune.serving.engine import Engine, deliver
from prefixtune.serving.limits import RequestError
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


@dataclass(eq=False)
class Row:
    """One sequence being generated: a greedy prompt (its n choices share it) or one sampled choice."""

    work: Work
    choices: list[int]
    prompt: list[int]
    inputs: PrefixInputs | None  # what its prefix adds; None: the bare model
    cache: DynamicCache | None = None  # its own cache while its prompt is fed
    fed: int = 0
    token: int = 0  # the token it feeds at the next step
    position: int = 0  # the position id of that token (after the prefix, when its prefix shifts positions)
    retried: bool = False  # re-fed once after a failed shared step
    alone: bool = False  # fed by itself: its group's prefill failed

    def refed(self) -> Row:
        """The row again from scratch, its tokens so far now part of its prompt (greedy continues exactly)."""
        produced = self.work.tokens[self.choices[0]]
        return Row(self.work, self.choices, [*self.prompt, *produced], self.inputs, retried=True)

    @property
    def offset(self) -> int:
        return 0 if self.inputs is None else self.inputs.offset

    @property
    def in_cache(self) -> bool:
        """Its prefix has keys/values in every layer, so they can sit at the front of its cache rows."""
        return self.inputs is not None and self.inputs.kv is not None and all(p is not None for p in self.inputs.kv)

    @property
    def reserved(self) -> int:
        """Cache positions this row may come to hold."""
        plen = 0 if self.inputs is None or self.inputs.kv is None else self.inputs.kv[0][0].shape[2]
        return len(self.prompt) + self.work.max_tokens + plen


def _state(slots: dict, prefixes: list[PrefixInputs | None]) -> attention.PrefixState | None:
    """The attention state of a batch whose row i has prefix `prefixes[i]` (None: none), positions
    left alone: the scheduler passes every row's position ids itself."""
    by_prefix: dict[int, tuple[list[int], PrefixInputs]] = {}
    for i, inputs in enumerate(prefixes):
        if inputs is not None:
            by_prefix.setdefault(id(inputs), ([], dataclasses.replace(inputs, offset=0)))[0].append(i)
    if not by_prefix:
        return None
    full = len(prefixes)
    groups = [(None if len(ix) == full else torch.tensor(ix), inputs) for ix, inputs in by_prefix.values()]
    return batching.build_state(slots, groups, full)


def _left_pad(cache: DynamicCache, n: int) -> None:
    if n:
        for layer in cache.layers:
            pad = layer.keys.new_zeros(*layer.keys.shape[:2], n, layer.keys.shape[3])
            layer.keys, layer.values = torch.cat([pad, layer.keys], 2), torch.cat([pad, layer.values], 2)


class RunningBatch:
    """The rows decoding together: one left-padded cache whose rows start with their prefix's keys and
    values, the mask that says which cache columns each row sees, and each row's next position."""

    def __init__(self, model: Any, slots: dict):
        self.model = model
        self.slots = slots
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.device = next(model.parameters()).device
        # Only the last position's logits are read: skip the vocabulary projection of the rest of a prompt.
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_only = {"logits_to_keep": 1} if accepts else {}
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.state: attention.PrefixState | None = None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                state: attention.PrefixState | None) -> torch.Tensor:  # fmt: skip
        """Last-position logits of one forward over `ids` with the cache and prefix state given."""
        with torch.no_grad(), attention.activate(state) if state is not None else contextlib.nullcontext():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                             **self.last_only)  # fmt: skip
        return out.logits[:, -1].float()

    def feed(self, row: Row, budget: int) -> torch.Tensor | None:
        """Feed up to `budget` more prompt tokens of a long prompt; its logits once the prompt is in."""
        if row.cache is None:
            row.cache = DynamicCache(config=self.model.config)
        piece = row.prompt[row.fed : row.fed + budget]
        positions = torch.arange(row.fed, row.fed + len(piece), device=self.device)[None] + row.offset
        row.fed += len(piece)
        row.position = row.offset + row.fed
        mask = torch.ones(1, row.fed, dtype=torch.long, device=self.device)
        ids = torch.tensor([piece], device=self.device)
        logits = self.forward(ids, mask, positions, row.cache, _state(self.slots, [row.inputs]))
        return logits[0] if row.fed == len(row.prompt) else None

    def prefill(self, rows: list[Row]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Whole prompts of several rows in one forward, left-padded: logits, cache and padding mask."""
        width = max(len(r.prompt) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
            row.fed = len(row.prompt)
            row.position = row.offset + row.fed
        ids, mask = ids.to(self.device), mask.to(self.device)
        offsets = torch.tensor([r.offset for r in rows], device=self.device)[:, None]
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + offsets
        cache = DynamicCache(config=self.model.config)
        return self.forward(ids, mask, positions, cache, _state(self.slots, [r.inputs for r in rows])), cache, mask

    def _prefix_into_cache(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
        """Put each row's prefix keys/values at the front of its cache rows, visible through the mask.

        A prefix is exactly the first P entries of a row's keys/values, so from here on a decoding
        step is the plain model over its cache: no prefix concatenated in every layer at every step.
        """
        state = _state(self.slots, [r.inputs if r.in_cache else None for r in rows])
        if state is None:
            return mask
        if len(cache.layers) != len(state.kv):
            raise RuntimeError(f"{len(cache.layers)} cache layers for {len(state.kv)} attention slots")
        visible = None
        for layer, (keys, values, seen) in zip(cache.layers, state.kv, strict=True):
            keys = attention.match_rows(keys, len(rows)).to(layer.keys.dtype)
            values = attention.match_rows(values, len(rows)).to(layer.values.dtype)
            layer.keys, layer.values = torch.cat([keys, layer.keys], 2), torch.cat([values, layer.values], 2)
            visible = seen if seen is not None else torch.ones(len(rows), keys.shape[2], dtype=torch.bool)
        return torch.cat([attention.match_rows(visible, len(rows)).to(mask), mask], 1)

    def add(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Join fed rows: the narrower of them and the batch is left-padded, then caches and masks stacked."""
        mask = self._prefix_into_cache(rows, cache, mask)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width, n = self.mask.shape[1], mask.shape[1]
            _left_pad(self.cache, max(0, n - width))
            _left_pad(cache, max(0, width - n))
            self.mask = torch.cat([self.mask.new_zeros(len(self.rows), max(0, n - width)), self.mask], 1)
            mask = torch.cat([mask.new_zeros(len(rows), max(0, width - n)), mask], 1)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])
            self.mask = torch.cat([self.mask, mask])
        self.rows.extend(rows)
        self._restate()

    def _restate(self) -> None:
        """The attention state of the rows whose prefix is not in the cache (it covers only some layers)."""
        self.state = _state(self.slots, [None if r.in_cache else r.inputs for r in self.rows])

    def keep(self, keep: list[int]) -> None:
        """Drop every row not in `keep`, and the padding columns no remaining row needs."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask, self.state = None, self.mask.new_zeros(0, 0), None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        dead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # all-padding columns on the left
        if dead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, dead:], layer.values[:, :, dead:]
            self.mask = self.mask[:, dead:]
        self._restate()

    def step(self) -> torch.Tensor:
        """One decoding step for every running row: `[B, vocab]` logits."""
        ids = torch.tensor([[r.token] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        logits = self.forward(ids, self.mask, positions, self.cache, self.state)
        for row in self.rows:
            row.position += 1
        return logits


def pick(logits: torch.Tensor, work: Work, top_k: int | None) -> int:
    """The next token: argmax for greedy rows; temperature, top-k and top-p sampling otherwise."""
    if not work.sampled:
        return int(logits.argmax())
    scores = logits / work.temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1)
    if work.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        drop = ordered.cumsum(-1) - ordered > work.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, ordered.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1))


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

    # ------------------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while not self._stopping.is_set():
            busy = bool(self.joining or self.batch.rows)
            classify = self._take(wait=0.0 if busy or self.backlog else 0.25)
            if classify:
                self._run_batch(classify)
            self._admit()
            self._prefill()
            try:
                self._decode()
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
        member = self.engine.bank[name]
        cached = self._inputs.get(name)
        if cached is None or cached[0] is not member:
            with torch.no_grad():
                cached = (member, member.inputs())
            self._inputs[name] = cached
            self.batch.slots = member.slots  # the same attention modules for every prefix of this model
            while len(self._inputs) > self.prefix_cache_size:
                self._inputs.popitem(last=False)
        self._inputs.move_to_end(name)
        return cached[1]

    def _rows_of(self, work: Work) -> list[Row]:
        inputs = self._prefix_inputs(work.prefix)
        rows = []
        for i, ids in enumerate(work.prompts):
            choices = [i * work.n + j for j in range(work.n)]
            for group in [[c] for c in choices] if work.sampled else [choices]:
                rows.append(Row(work, group, ids, inputs))
        return rows

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
                group = []
                while self.joining and self._fresh(self.joining[0]) and len(self.joining[0].prompt) <= budget:
                    group.append(self.joining.popleft())
                    budget -= len(group[-1].prompt)
                self._join_group(group)

    def _fresh(self, row: Row) -> bool:
        """A short prompt not fed yet, which can share a prefill forward with others."""
        return not (row.fed or row.alone or len(row.prompt) > self.prefill_chunk or row.work.closed)

    def _join_group(self, rows: list[Row]) -> None:
        try:
            logits, cache, mask = self.batch.prefill(rows)
        except Exception:  # noqa: BLE001 - find the row at fault: each is fed again alone
            for row in reversed(rows):
                row.fed, row.alone = 0, True
                self.joining.appendleft(row)
            return
        self._joined(rows, logits, cache, mask)

    def _feed_alone(self, row: Row, budget: int) -> int:
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
        self.batch.add([rows[i] for i in keep], cache, mask)

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

    def _decode(self) -> None:
        batch = self.batch
        if not batch.rows:
            return
        live = [i for i, r in enumerate(batch.rows) if not (r.work.cancelled or r.work.closed)]
        batch.keep(live)
        if not batch.rows:
            return
        logits = batch.step()
        self.stats["steps"] += 1
        self.stats["rows"] += len(batch.rows)
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
