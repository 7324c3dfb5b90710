"""What one app owns, and how a request's `model` field becomes a loaded prefix.

`PrefixServer` holds the model, tokenizer, prefix collection and folder, batcher and limits; the
routes reach everything through it (it is `app.state.prefixtune`). Its own logic is the part every
endpoint shares: resolving a model id (the base model's id means no prefix; a subfolder dropped in
since the last scan is loaded on the spot), describing a model, and handing a checked request to the
batcher. It also turns a request's prompts into token ids and checks them against the limits
before they reach the batcher: on the event loop, an over-long prompt or an oversized request is
answered 400 at once with the limit it broke, instead of failing inside a shared batch. The limits:
`max_tokens_limit`, `max_batch_size` rows (prompts x n when sampling), `max_prompt_tokens`, and the
model's own positions (prompt + prefix + new tokens). Waiting for results is `work.Transcript`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from prefixtune import serialization, tasks
from prefixtune.chat import FORMATS as CHAT_FORMATS
from prefixtune.collection import PrefixCollection
from prefixtune.errors import PrefixTuneError
from prefixtune.model import PrefixModel
from prefixtune.serving import scheduler
from prefixtune.serving.batcher import Batcher
from prefixtune.serving.engine import Engine
from prefixtune.serving.limits import NAME_RE, RequestError, Settings
from prefixtune.serving.prefix_folder import PrefixFolder
from prefixtune.serving.schemas import ChatMessage
from prefixtune.serving.work import Transcript, Work

log = logging.getLogger("prefixtune.server")


class PrefixServer:
    """Everything one app owns: model, tokenizer, prefix folder, batcher, limits; and the request logic
    that is not HTTP plumbing (name lookup, limit checks before queueing)."""

    def __init__(self, model: Any, tokenizer: Any, task: str, prefixes_dir: str | Path, base_id: str, s: Settings):
        self.settings = s
        self.base_id = base_id
        self.tokenizer = tokenizer
        tokenizer("warm up")  # lets the tokenizer settle any padding/truncation state before threads share it
        self.bank = PrefixCollection(model)
        self.engine = Engine(self.bank, tokenizer, task)
        self.batcher = self._batcher(s)
        self.folder = PrefixFolder(prefixes_dir, self.bank, base_id, s.max_loaded_prefixes)
        self.folder.sync()
        self.engine.loader = self.folder.load if s.max_loaded_prefixes else None
        self.vocab = model.get_input_embeddings().num_embeddings
        self.max_positions = tasks.max_positions(model)
        self.created = int(time.time())
        self.warned: set[str] = set()  # warnings already logged (a chat request per token would repeat them)

    def _batcher(self, s: Settings) -> Batcher:
        """The continuous scheduler where the model allows it and it is asked for, else the dynamic batcher."""
        if s.scheduler not in ("continuous", "batch"):
            raise PrefixTuneError(f"scheduler must be 'continuous' or 'batch', got {s.scheduler!r}")
        why = scheduler.unsupported(self.engine) if s.scheduler == "continuous" else "it was asked for"
        if why is None:
            log.info("scheduling: continuous batching (up to %d rows, %d cache positions)",
                     s.max_batch_size, s.max_cache_tokens)  # fmt: skip
            return scheduler.ContinuousBatcher(self.engine, s.max_batch_size, s.max_queue, s.max_cache_tokens,
                                               s.prefill_chunk)  # fmt: skip
        log.info("scheduling: dynamic batches (collected for %g ms) because %s", s.max_wait_ms, why)
        return Batcher(self.engine, s.max_batch_size, s.max_wait_ms, s.max_queue)

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
            await self.batcher.call(lambda: self._ready(name))
            if name in self.bank:
                return name
            if name in self.folder.errors:
                msg = f"prefix {name!r} is in the folder but failed to load: {self.folder.errors[name]}"
                raise RequestError(404, msg, code="model_not_found")
        msg = f"unknown model {name!r}: neither a loaded prefix nor the base model {self.base_id!r}; see /v1/models"
        raise RequestError(404, msg, code="model_not_found")

    def _ready(self, name: str) -> None:
        """On the worker: pick up a new folder, and load a registered prefix on demand (with a bound)."""
        if not self.folder.max_loaded or name not in self.folder.seen:
            self.folder.sync()
        if self.folder.max_loaded and name in self.folder.seen and name not in self.bank:
            with contextlib.suppress(Exception):  # the reason is in folder.errors
                self.folder.load(name)

    def member(self, name: str) -> PrefixModel:
        """A loaded prefix; 404 if it was removed a moment ago (the folder poller, an admin delete)."""
        try:
            return self.bank.members[name]
        except KeyError:
            raise RequestError(404, f"prefix {name!r} was just removed", code="model_not_found") from None

    def check_name(self, name: str) -> None:
        """Refuse (400) a name an admin upload or delete may not use."""
        if not NAME_RE.fullmatch(name) or name == self.base_id:
            raise RequestError(
                400,
                f"invalid prefix name {name!r}: 1-128 letters, digits, '_' or '-', "
                "starting with a letter or digit, and not the base model's id",
            )

    def card(self, name: str | None) -> dict:
        """The /v1/models entry of the base model (None) or of a loaded prefix."""
        card = {"object": "model", "created": self.created, "owned_by": "prefixtune"}
        if name is None:
            return {"id": self.base_id, **card, "parent": None, "task": self.engine.task}
        if name not in self.bank:  # registered, not loaded now: its saved config says the same
            record = serialization.read_config(self.folder.root / name)
            method, length, task = record["prefix"]["method"], record["prefix"]["num_virtual_tokens"], record["task"]
        else:
            member = self.member(name)
            method, length, task = member.prefix_config.method, member.prefix_config.num_virtual_tokens, member.task
        return {"id": name, **card, "parent": self.base_id, "task": task, "method": method,
                "num_virtual_tokens": length}  # fmt: skip

    # ------------------------------------------------------------------------------ prompts and limits
    def encode(self, prompt: str | list, special: bool = True) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of strings, a list of ids or a list of id lists."""
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

    def chat_mismatch(self, prefix: str | None) -> str | None:
        """Why serving `prefix` through the chat template differs from how it learnt, or None.

        A prefix trained on raw text saw no template; a chat endpoint wraps its prompts in one. The
        training record says which (a prefix without one, e.g. converted from PEFT, is not judged)."""
        if prefix is None:
            return None
        trained = tasks.read_train_info(self.folder.root / prefix).get("data_format")
        if trained is None or trained in CHAT_FORMATS:
            return None
        return f"prefix {prefix!r} was trained on raw text ({trained}), not chat: the chat template is new to it"

    def encode_chat(self, messages: list[ChatMessage]) -> list[list[int]]:
        """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's turn."""
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

    def check_limits(self, work: Work, prefix: str | None) -> None:
        """Refuse (400) a request over one of the server's limits or beyond the model's positions."""
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

    # ------------------------------------------------------------------------------ requests and the folder
    def submit(self, work: Work, prefix: str | None) -> Transcript:
        """Check `work` against the limits and queue it; the transcript is where its results arrive."""
        self.check_limits(work, prefix)
        self.batcher.submit(work)
        return Transcript(work, self.engine.decode, self.settings.request_timeout_s)

    async def poll(self) -> None:
        """Rescan the prefix folder every `reload_interval_s` seconds, for ever (the app's lifespan cancels it)."""
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self.batcher.call(self.folder.sync)
            except Exception:  # noqa: BLE001 - keep polling after a failed scan (e.g. folder briefly gone)
                log.exception("scanning the prefix folder failed")
