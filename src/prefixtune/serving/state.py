"""What one app owns, and how a request's `model` field becomes a loaded prefix.

`PrefixServer` holds the model, tokenizer, prefix collection and folder, batcher and limits; the
routes reach everything through it (it is `app.state.prefixtune`). Its own logic is the part every
endpoint shares: resolving a model id (the base model's id means no prefix; a subfolder dropped in
since the last scan is loaded on the spot), describing a model, and handing a checked request to the
batcher. Tokenising and the per-request limits are in `prompts.py`, waiting for results in
`transcript.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from prefixtune import serialization, tasks
from prefixtune.collection import PrefixCollection
from prefixtune.model import PrefixModel
from prefixtune.serving import prompts
from prefixtune.serving.batcher import Batcher
from prefixtune.serving.engine import Engine
from prefixtune.serving.errors import RequestError
from prefixtune.serving.prefix_store import PrefixFolder
from prefixtune.serving.settings import NAME_RE, Settings
from prefixtune.serving.transcript import Transcript
from prefixtune.serving.work import Work

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
        self.batcher = Batcher(self.engine, s.max_batch_size, s.max_wait_ms, s.max_queue)
        self.folder = PrefixFolder(prefixes_dir, self.bank, base_id)
        self.folder.sync()
        self.vocab = model.get_input_embeddings().num_embeddings
        self.max_positions = tasks.max_positions(model)
        self.created = int(time.time())

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
            await self.batcher.call(self.folder.sync)
            if name in self.bank:
                return name
            if name in self.folder.errors:
                msg = f"prefix {name!r} is in the folder but failed to load: {self.folder.errors[name]}"
                raise RequestError(404, msg, code="model_not_found")
        msg = f"unknown model {name!r}: neither a loaded prefix nor the base model {self.base_id!r}; see /v1/models"
        raise RequestError(404, msg, code="model_not_found")

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
        member = self.member(name)
        cfg = member.prefix_config
        return {
            "id": name,
            **card,
            "parent": self.base_id,
            "task": member.task,
            "method": cfg.method,
            "num_virtual_tokens": cfg.num_virtual_tokens,
        }

    # ------------------------------------------------------------------------------ requests and the folder
    def submit(self, work: Work, prefix: str | None) -> Transcript:
        """Check `work` against the limits and queue it; the transcript is where its results arrive."""
        prompts.check(self, work, prefix)
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
