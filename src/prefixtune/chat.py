"""Conversational data in TRL's formats: rendered with the tokenizer's chat template, loss on assistant tokens.

Two shapes of record are conversational, as in TRL:
- `messages`: a list of `{"role", "content"}` turns; every assistant turn is learnt;
- `prompt` / `completion`, each a list of turns: the completion's assistant turns are learnt.
(String `prompt`/`completion` columns are plain text: they become the text and target of a raw-text
row, with no template.)

Which tokens are the assistant's is found from the rendered text, not from `{% generation %}` marks,
which most templates (SmolLM2's among them) do not carry: the conversation up to each learnt turn is
rendered with and without that turn, and the characters in between are the turn (its end-of-turn
marker included, so the model learns to stop). Tokens whose first character falls there get labels;
everything else, system and user turns and the template's own text, gets -100.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from prefixtune.data import IGNORE_INDEX, TruncationWarning
from prefixtune.errors import PrefixTuneError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("messages", "prompt_completion")  # the conversational formats: served through the chat template


def record_format(record: dict) -> str:
    """'messages', 'prompt_completion' (conversational), 'text_pair' (string prompt/completion) or 'text'."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion" if isinstance(record["prompt"], list) else "text_pair"
    return "text"


def _turns(value: Any, where: str, column: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise PrefixTuneError(f"{where}: column {column!r} must be a non-empty list of {{role, content}} turns")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or turn.get("role") not in ROLES:
            raise PrefixTuneError(
                f"{where}: {column}[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}, "
                f"got {turn!r}"
            )
    return [{"role": t["role"], "content": t["content"]} for t in value]


def to_row(record: dict, where: str) -> dict:
    """A conversational record as a row: `messages`, and `learn_from`, the first turn whose loss counts."""
    kind = record_format(record)
    if kind == "messages":
        messages = _turns(record["messages"], where, "messages")
        learn_from = 0
    elif kind == "prompt_completion":
        prompt = _turns(record["prompt"], where, "prompt")
        messages = prompt + _turns(record["completion"], where, "completion")
        learn_from = len(prompt)
    else:
        raise PrefixTuneError(f"{where}: not a conversation (no 'messages', no list 'prompt'/'completion')")
    if not any(m["role"] == "assistant" for m in messages[learn_from:]):
        raise PrefixTuneError(f"{where}: the conversation has no assistant turn to learn")
    return {"messages": messages, "learn_from": learn_from}


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise PrefixTuneError(
            "chat data needs a tokenizer with a chat template (an instruct model's), and this one has none; "
            "use raw text columns (--text-column/--target-column) instead"
        )


def assistant_spans(tokenizer: Any, messages: list[dict], learn_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its learnt assistant turns."""
    check_template(tokenizer)
    text = _render(tokenizer, messages, False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < learn_from:
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise PrefixTuneError(
                "the tokenizer's chat template renders a conversation differently from its beginning, so the "
                "assistant turns cannot be located; use prompt/completion text columns instead"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode_row(tokenizer: Any, row: dict, budget: int) -> tuple[dict, bool]:
    """One conversation as `input_ids`/`attention_mask`/`labels`; cut from the left to `budget` if longer."""
    text, spans = assistant_spans(tokenizer, row["messages"], row.get("learn_from", 0))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
              for tok, (start, _) in zip(ids, offsets, strict=True)]  # fmt: skip
    cut = len(ids) > budget
    if cut:
        ids, labels = ids[-budget:], labels[-budget:]
    if all(label == IGNORE_INDEX for label in labels):
        raise PrefixTuneError(f"a conversation keeps no assistant token within the {budget}-token input budget")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, cut


def encode(tokenizer: Any, rows: Sequence[dict], budget: int) -> list[dict]:
    examples, cut = [], 0
    for row in rows:
        example, was_cut = encode_row(tokenizer, row, budget)
        examples.append(example)
        cut += was_cut
    if cut:
        warnings.warn(f"{cut} of {len(rows)} conversations were cut from the left to {budget} tokens",
                      TruncationWarning, stacklevel=2)  # fmt: skip
    return examples


def generation_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """What a model answering `messages` is given: the conversation and the template's assistant opening."""
    check_template(tokenizer)
    return _render(tokenizer, messages, True)
