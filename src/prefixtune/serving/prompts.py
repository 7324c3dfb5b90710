"""A request's prompts as token ids, and the limits they must fit before they reach the batcher.

Checking here, on the event loop, means an over-long prompt or an oversized request is answered 400
at once with a message that says which limit it broke, instead of failing inside a shared batch.
The limits: `max_tokens_limit`, `max_batch_size` rows (prompts x n when sampling),
`max_prompt_tokens`, and the model's own positions (prompt + prefix + new tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefixtune.serving.errors import RequestError
from prefixtune.serving.schemas import ChatMessage
from prefixtune.serving.work import Work

if TYPE_CHECKING:
    from prefixtune.serving.state import PrefixServer


def encode(srv: PrefixServer, prompt: str | list, special: bool = True) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of ids or a list of id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    prompts = [srv.tokenizer(p, add_special_tokens=special)["input_ids"] if isinstance(p, str) else p for p in prompt]
    if not prompts or not all(prompts):
        raise RequestError(400, "the prompt is empty")
    if any(not 0 <= t < srv.vocab for p in prompts for t in p):
        raise RequestError(400, f"prompt token ids must be in [0, {srv.vocab})")
    return prompts


def encode_chat(srv: PrefixServer, messages: list[ChatMessage]) -> list[list[int]]:
    """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(srv.tokenizer, "chat_template", None):
        raise RequestError(400, "the model's tokenizer has no chat template; use /v1/completions")
    try:
        text = srv.tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
        raise RequestError(400, f"the chat template refused these messages: {exc}") from exc
    return encode(srv, text, special=False)


def _used(srv: PrefixServer, prefix: str | None) -> int:
    return 0 if prefix is None else srv.member(prefix).positions_used


def room(srv: PrefixServer, prompts: list[list[int]], prefix: str | None) -> int:
    """Default max_tokens when a chat request names none: the limit, or what fits the model."""
    limit = srv.settings.max_tokens_limit
    if not srv.max_positions or srv.engine.task != "causal_lm":
        return limit
    return max(1, min(limit, srv.max_positions - _used(srv, prefix) - max(len(p) for p in prompts)))


def check(srv: PrefixServer, work: Work, prefix: str | None) -> None:
    """Refuse (400) a request over one of the server's limits or beyond the model's positions."""
    s = srv.settings
    if work.kind == "generate" and work.max_tokens > s.max_tokens_limit:
        raise RequestError(400, f"max_tokens={work.max_tokens} is above this server's limit of {s.max_tokens_limit}")
    if work.rows > s.max_batch_size:
        raise RequestError(
            400,
            f"this request needs {work.rows} batch rows (prompts x n when sampling); the limit is "
            f"max_batch_size={s.max_batch_size}",
        )
    used = _used(srv, prefix)
    for ids in work.prompts:
        if len(ids) > s.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt has {len(ids)} tokens; the limit is {s.max_prompt_tokens}",
                code="context_length_exceeded",
            )
        need = len(ids) + used + (work.max_tokens if srv.engine.task == "causal_lm" else 0)
        if srv.max_positions and need > srv.max_positions:
            raise RequestError(
                400,
                f"prompt ({len(ids)} tokens) + prefix ({used}) + max_tokens ({work.max_tokens}) = {need} "
                f"exceeds the model's {srv.max_positions} positions",
                code="context_length_exceeded",
            )
