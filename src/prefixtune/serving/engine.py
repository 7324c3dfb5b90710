"""The model side of the worker: one group of compatible requests becomes one model call.

`Engine` pads the group's prompts into one mixed-prefix batch and runs it through the
`PrefixCollection`; `Router` follows a `generate` call step by step, handing each row's new token to
the requests that share the row and telling `generate` which rows are done. Nothing here knows about
queues, threads or HTTP: the batcher decides what runs together, the engine only runs it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from prefixtune.collection import PrefixCollection, UnknownPrefixError
from prefixtune.serving.work import Work


def deliver(work: Work, choices: list[int], token: int, eos: set[int], decode: Callable[[list[int]], str]) -> bool:
    """Hand a row's new token to the choices sharing the row; True when the row is finished.

    A row ends on EOS, at its request's `max_tokens`, on a stop string, or when the request was
    cancelled. The dynamic batcher's `Router` and the continuous scheduler both end rows here.
    """
    produced = work.tokens[choices[0]]
    if work.cancelled:
        return True
    if token in eos:
        _finish(work, choices, "stop")
        return True
    for c in choices:
        if c != choices[0]:
            work.tokens[c].append(token)
        work.emit(("token", c, token))
    produced.append(token)
    if len(produced) >= work.max_tokens:
        _finish(work, choices, "length")
        return True
    if work.stop and any(s in decode(produced) for s in work.stop):
        _finish(work, choices, "stop")
        return True
    return False


def _finish(work: Work, choices: list[int], reason: str) -> None:
    for c in choices:
        work.finish(c, reason)


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
            if not work.cancelled and step <= len(work.tokens[choices[0]]):
                continue  # a rerun after a failed batch: this token was already sent
            self.done[r] = deliver(work, choices, tok, self.eos, self.decode)

    def close(self) -> None:
        """After `generate` returns: rows still open ran to the call's token limit, i.e. their own."""
        for r, (work, choices) in enumerate(self.rows):
            if not self.done[r]:
                _finish(work, choices, "length")


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
        self.loader: Callable[[str], None] | None = None  # loads a prefix on demand, where prefixes load lazily

    def member(self, name: str) -> Any:
        """A loaded prefix (loaded now, where prefixes load on demand); UnknownPrefixError if it is gone."""
        if self.loader is not None:
            try:
                self.loader(name)  # loads it if it is not loaded, and notes the use for the bound
            except Exception as exc:  # noqa: BLE001 - reported as the prefix being unavailable
                raise UnknownPrefixError(f"prefix {name!r} could not be loaded: {exc}") from exc
        return self.bank[name]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def run(self, group: list[Work]) -> int:
        """Answer a group of compatible requests with one model call; the decoding steps it took (0: classify)."""
        group = [w for w in group if not w.closed and not w.cancelled]
        for w in group:
            if w.prefix is None:
                continue
            try:
                self.member(w.prefix)
            except UnknownPrefixError:
                w.fail(UnknownPrefixError(f"prefix {w.prefix!r} was removed before the request ran"))
        group = [w for w in group if not w.closed]
        if not group:
            return 0
        if group[0].kind == "generate":
            return self._generate(group)
        self._classify(group)
        return 0

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

    def _generate(self, group: list[Work]) -> int:
        rows: list[tuple[Work, list[int]]] = []
        prompts, prefixes = [], []
        for w in group:
            for ids, choices in w.row_choices():
                rows.append((w, choices))
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
        return router.step

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
