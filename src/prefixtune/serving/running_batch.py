"""The running batch of the continuous scheduler: its rows, their one cache, and how rows join and leave.

Rows are left-padded to one length, so a row joins by padding the narrower side and stacking caches,
and leaves by giving its place to the last row and trimming the padding no row needs any more (the
cache's layers, `growing_cache.GrowingLayer`, do both in place). A row's prefix
keys/values sit at the front of its cache rows (they are exactly the first P entries of its keys and
values); only a prefix that covers some layers, not all, stays in the attention state, because the
padding mask is shared by every layer. Every row passes its own position ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from prefixtune.core import attention, batching, ragged
from prefixtune.core.batching import PrefixInputs
from prefixtune.serving.growing_cache import fill_order, growing_cache
from prefixtune.serving.work import Work


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
    def plen(self) -> int:
        """Cache positions its prefix takes."""
        return 0 if self.inputs is None or self.inputs.kv is None else self.inputs.kv[0][0].shape[2]

    @property
    def reserved(self) -> int:
        """Cache positions this row may come to hold."""
        return len(self.prompt) + self.work.max_tokens + self.plen


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
    for layer in cache.layers:
        layer.pad_front(n)


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
            row.cache = growing_cache(self.model.config)
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
        cache = growing_cache(self.model.config)
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
            layer.prepend(keys, values)
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
                mine.stack(theirs.keys, theirs.values)
            self.mask = torch.cat([self.mask, mask])
        self.rows.extend(rows)
        self._restate()

    def _restate(self) -> None:
        """The attention state of the rows whose prefix is not in the cache (it covers only some layers)."""
        self.state = _state(self.slots, [None if r.in_cache else r.inputs for r in self.rows])

    def keep(self, keep: list[int]) -> None:
        """Drop every row not in `keep` (ascending), and the padding columns no remaining row needs. The
        last rows take the places of those that leave, so only they move in the cache."""
        if len(keep) == len(self.rows):
            return
        order = fill_order(keep, len(self.rows))
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.cache, self.mask, self.state = None, self.mask.new_zeros(0, 0), None
            return
        for layer in self.cache.layers:
            layer.move_rows(order)
        self.mask = self.mask[torch.tensor(order, device=self.mask.device)]
        dead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # all-padding columns on the left
        if dead:
            for layer in self.cache.layers:
                layer.drop_front(dead)
            self.mask = self.mask[:, dead:]
        self._restate()

    def step(self, joiners: list[Row] | None = None) -> torch.Tensor:
        """One decoding step for every running row: `[B, vocab]` logits. With `joiners` (rows whose prefix,
        if any, is in the cache), their whole prompts ride in the same forward (`core/ragged.py`) and they
        join: `[B + joiners, vocab]`, each joiner's logits those of its prompt's last token."""
        if joiners:
            return self._ragged_step(joiners)
        ids = torch.tensor([[r.token] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        logits = self.forward(ids, self.mask, positions, self.cache, self.state)
        for row in self.rows:
            row.position += 1
        return logits

    def _ragged_step(self, joiners: list[Row]) -> torch.Tensor:
        lengths = [len(r.prompt) for r in joiners]
        width = self.mask.shape[1] + 1  # the columns in use after the step
        wider = max(n + r.plen for n, r in zip(lengths, joiners, strict=True)) - width
        if wider > 0:
            _left_pad(self.cache, wider)
            self.mask = torch.cat([self.mask.new_zeros(len(self.rows), wider), self.mask], 1)
            width += wider
        seen = torch.zeros(len(joiners), width, dtype=self.mask.dtype, device=self.device)
        for j, (n, row) in enumerate(zip(lengths, joiners, strict=True)):
            seen[j, width - n - row.plen :] = 1
        for i, layer in enumerate(self.cache.layers):  # the joiners' rows: their prefix, then room for the prompt
            keys = layer.keys.new_zeros(len(joiners), layer.keys.shape[1], width - 1, layer.keys.shape[3])
            values = torch.zeros_like(keys)
            for j, (n, row) in enumerate(zip(lengths, joiners, strict=True)):
                if row.plen:
                    keys[j, :, width - n - row.plen : width - n] = row.inputs.kv[i][0][0]
                    values[j, :, width - n - row.plen : width - n] = row.inputs.kv[i][1][0]
            layer.stack(keys, values)
            layer.reserve(width)
        visible = torch.cat([torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1), seen])
        plan = ragged.RaggedPlan.build([1] * len(self.rows) + lengths, visible.bool())
        ids = [r.token for r in self.rows] + [t for r in joiners for t in r.prompt]
        positions = [r.position for r in self.rows] + [r.offset + k for r in joiners for k in range(len(r.prompt))]
        last = torch.cumsum(torch.tensor([1] * len(self.rows) + lengths, device=self.device), 0) - 1
        for layer in self.cache.layers:
            layer.plan = plan
        try:
            with torch.no_grad(), attention.activate(attention.PrefixState(slots={}, ragged=plan)):
                out = self.model(input_ids=torch.tensor([ids], device=self.device), position_ids=torch.tensor(
                    [positions], device=self.device), cache=self.cache, use_cache=True, **self._keep(last))  # fmt: skip
        finally:
            for layer in self.cache.layers:
                layer.plan = None
        logits = out.logits[0] if self.last_only else out.logits[0, last]
        for row in self.rows:
            row.position += 1
        for n, row in zip(lengths, joiners, strict=True):
            row.fed, row.position = n, row.offset + n
        self.mask = visible
        self.rows.extend(joiners)
        self._restate()
        return logits.float()

    def _keep(self, last: torch.Tensor) -> dict:
        return {"logits_to_keep": last} if self.last_only else {}


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
