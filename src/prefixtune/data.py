"""User data: reading tables, encoding labels, and tokenizing within the prefix budget.

Every mistake in a user's file becomes one :class:`PrefixTuneError` whose message names the file
and the place, because a traceback from deep inside ``csv`` or a tokenizer tells a user nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from .errors import PrefixTuneError, first_line

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
Mode = Literal["classification", "causal_lm", "seq2seq"]


class TruncationWarning(UserWarning):
    """Rows did not fit in ``max_length - prefix_tokens`` and were cut (own class, so it can be filtered)."""


# ------------------------------------------------------------------------------------ reading


def decode_utf8(path: str, raw: bytes) -> str:
    """UTF-8 (an Excel-style BOM is skipped); on failure say where, since the user must fix the file.

    The one decoder of user files (data, texts to predict on, recipes): `path` names the file in the error.
    """
    skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        line = raw[:offset].count(b"\n") + 1
        raise PrefixTuneError(
            f"{path}: not valid UTF-8 at line {line} (byte offset {offset}); re-save the file as UTF-8"
        ) from None


def _read_csv(path: str, text: str, delimiter: str) -> tuple[list[tuple[str, dict]], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = list(reader.fieldnames or [])
        rows = []
        for rec in reader:
            if None in rec:
                raise PrefixTuneError(
                    f"{path}: line {reader.line_num} has more fields than the header ({len(header)} columns)"
                )
            if any(v is None for v in rec.values()):
                raise PrefixTuneError(
                    f"{path}: line {reader.line_num} has fewer fields than the header ({len(header)} columns)"
                )
            rows.append((f"line {reader.line_num}", rec))
    except csv.Error as exc:
        raise PrefixTuneError(f"{path}: malformed CSV at line {reader.line_num}: {exc}") from None
    return rows, header


def _read_json(path: str, text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrefixTuneError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise PrefixTuneError(
            f"{path}: expected a JSON list of objects, got a {type(data).__name__} (use .jsonl for one object per line)"
        )
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise PrefixTuneError(f"{path}: item {i} is a {type(item).__name__}, expected an object")
    return [(f"item {i}", item) for i, item in enumerate(data)]


def _read_jsonl(path: str, text: str) -> list[tuple[str, dict]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrefixTuneError(f"{path}: malformed JSON on line {lineno}: {exc.msg}") from None
        if not isinstance(item, dict):
            raise PrefixTuneError(f"{path}: line {lineno} is a {type(item).__name__}, expected an object")
        rows.append((f"line {lineno}", item))
    return rows


def read_records(path: str) -> tuple[list[tuple[str, dict]], list[str] | None]:
    """A CSV/TSV, JSON or JSONL file as `(where, record)` pairs (and the CSV header), never empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PrefixTuneError(f"{path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".json", ".jsonl", ".ndjson"):
        raise PrefixTuneError(
            f"{path}: unsupported file type {ext or '(none)'!r}; expected .csv, .tsv, .json or .jsonl"
        )
    with open(path, "rb") as f:
        text = decode_utf8(path, f.read())
    header = None
    if ext in (".csv", ".tsv"):
        raw_rows, header = _read_csv(path, text, "\t" if ext == ".tsv" else ",")
        if not header:
            raise PrefixTuneError(f"{path}: the file is empty (no header, no rows)")
    else:
        raw_rows = _read_json(path, text) if ext == ".json" else _read_jsonl(path, text)
    if not raw_rows:
        raise PrefixTuneError(f"{path}: the data set is empty (no rows)")
    return raw_rows, header


def read_table(
    path: str,
    text_column: str = "text",
    label_column: str | None = "label",
    target_column: str | None = None,
    group_column: str | None = None,
) -> list[dict]:
    """Read a CSV/TSV, JSON (list of objects) or JSONL file into rows ``{"text", "label"?, "target"?, "group"?}``.

    Columns are renamed to the canonical keys ``text``/``label``/``target`` so that the rest of the
    library never needs to carry user column names around. Labels are kept as found (int or str);
    pass the rows to :func:`encode_labels` to get class indices.
    """
    path = os.fspath(path)
    return table_rows(path, *read_records(path), text_column, label_column, target_column, group_column)


def table_rows(
    path: str,
    raw_rows: list[tuple[str, dict]],
    header: list[str] | None,
    text_column: str = "text",
    label_column: str | None = "label",
    target_column: str | None = None,
    group_column: str | None = None,
) -> list[dict]:
    """`read_table` on records already read by `read_records` (`path` names them in errors)."""
    wanted = [("text", text_column), ("label", label_column), ("target", target_column), ("group", group_column)]
    wanted = [(key, col) for key, col in wanted if col is not None]
    if header is not None:
        for _, col in wanted:
            if col not in header:
                raise PrefixTuneError(f"{path}: column {col!r} not found; columns present: {', '.join(header)}")

    rows = []
    for where, rec in raw_rows:
        row: dict[str, Any] = {}
        for key, col in wanted:
            if col not in rec:
                present = ", ".join(map(str, rec)) or "(none)"
                raise PrefixTuneError(f"{path}: {where} has no column {col!r}; columns present: {present}")
            value = rec[col]
            if key in ("text", "target") and not isinstance(value, str):
                raise PrefixTuneError(
                    f"{path}: {where}: column {col!r} must be a string, got {type(value).__name__} {value!r}"
                )
            if key == "label" and (isinstance(value, bool) or not isinstance(value, (int, str))):
                raise PrefixTuneError(
                    f"{path}: {where}: label column {col!r} must be an int or a string, "
                    f"got {type(value).__name__} {value!r}"
                )
            row[key] = str(value) if key == "group" else value
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- labels


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def encode_labels(
    rows: Sequence[dict], label_names: list[str] | None = None, label_column: str = "label"
) -> tuple[list[int], list[str]]:
    """Turn int or string labels into class indices, returning ``(indices, label_names)``.

    Without ``label_names`` they are built so that the mapping is reproducible: integer labels
    (or strings such as "0"/"1" from a CSV) keep their value and get names "0".."K-1"; other
    strings are sorted. With ``label_names`` a string must be one of them (or an in-range index),
    so a typo in a validation file fails loudly instead of becoming a new class.
    """
    values = []
    for i, row in enumerate(rows):
        value = row.get(label_column)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, str)):
            raise PrefixTuneError(f"row {i}: label must be an int or a string, got {value!r}")
        values.append(value)
    if not values:
        raise PrefixTuneError("no rows to encode labels for")

    if label_names is None:
        ints = [_as_int(v) for v in values]
        if all(x is not None for x in ints):
            if min(ints) < 0:  # type: ignore[type-var]
                raise PrefixTuneError(f"integer labels must be >= 0, got {min(ints)}")  # type: ignore[type-var]
            return list(ints), [str(k) for k in range(max(ints) + 1)]  # type: ignore[arg-type,type-var]
        label_names = sorted({str(v) for v in values})

    names = list(label_names)
    index = {name: k for k, name in enumerate(names)}
    out = []
    for v in values:
        if isinstance(v, str) and v in index:
            out.append(index[v])
            continue
        k = _as_int(v)
        if k is not None and 0 <= k < len(names):
            out.append(k)
            continue
        raise PrefixTuneError(f"unknown label {v!r}; known labels: {', '.join(map(repr, names))}")
    return out, names


# ---------------------------------------------------------------------------------------- hub


def load_hub_dataset(
    name: str, config: str | None = None, split: str | None = None, **kwargs: Any
) -> dict[str, list[dict]]:
    """Load a Hugging Face hub data set as ``{split: rows}`` (needs network or a local cache).

    Any failure (offline, missing data set, bad config) becomes one PrefixTuneError line, since
    ``datasets`` errors are long and the usual fix is simply "use a local file instead".
    """
    try:
        import datasets
    except ImportError:
        raise PrefixTuneError("loading hub data sets needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
        raise PrefixTuneError(
            f"could not load hub data set {name!r}"
            + (f" (config {config!r})" if config else "")
            + f": {type(exc).__name__}: {first_line(exc)}; offline? use a local CSV/JSON/JSONL file instead"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        return {k: v.to_list() for k, v in ds.items()}
    return {split or "train": ds.to_list()}


# ------------------------------------------------------------------------------- tokenization


def _budget(max_length: int, prefix_tokens: int) -> int:
    budget = max_length - prefix_tokens
    if budget < 1:
        raise PrefixTuneError(
            f"max_length {max_length} leaves no room for input after {prefix_tokens} prefix tokens; "
            "use fewer prefix tokens or a larger max_length"
        )
    return budget


def _warn_truncated(n: int, total: int, budget: int, max_length: int, prefix_tokens: int, what: str) -> None:
    if n:
        warnings.warn(
            f"{n} of {total} rows were truncated to {budget} tokens "
            f"(max_length {max_length} - {prefix_tokens} prefix tokens){what}",
            TruncationWarning,
            stacklevel=3,
        )


def _tokenize_truncated(tokenizer: Any, texts: list[str], budget: int, **kw: Any) -> tuple[dict, int]:
    """Tokenize; rows longer than budget are re-tokenized with truncation so special tokens survive."""
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if budget <= special:
        raise PrefixTuneError(
            f"an input budget of {budget} tokens cannot hold the tokenizer's {special} special tokens "
            "plus any text; use fewer prefix tokens or a larger max_length"
        )
    enc = dict(tokenizer(texts, truncation=False, verbose=False, **kw))
    long_rows = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > budget]
    if long_rows:
        cut = tokenizer([texts[i] for i in long_rows], truncation=True, max_length=budget, **kw)
        for key, column in enc.items():
            for j, i in enumerate(long_rows):
                column[i] = cut[key][j]
    return enc, len(long_rows)


def tokenize_with_budget(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    prefix_tokens: int,
    targets: Sequence[str] | None = None,
    mode: Mode = "classification",
    labels: Sequence[int] | None = None,
    max_target_length: int | None = None,
) -> dict[str, list]:
    """Tokenize so that prefix + input never exceeds ``max_length`` (unpadded python lists).

    ``max_length`` should be ``min(model max positions, user max_length)``: the prefix occupies
    ``prefix_tokens`` positions, so inputs get ``max_length - prefix_tokens``. Rows that do not fit
    are truncated and one :class:`TruncationWarning` says how many.

    - classification: ``labels`` (class indices) are passed through unchanged if given.
    - causal_lm: prompt + target + eos in one sequence; ``labels`` are -100 on the prompt so the
      loss covers only the target. Prompts are cut from the left (the end of the prompt, nearest
      the target, matters most); the target is cut only if no prompt is left. Include any
      separator (e.g. a trailing space or "\\nHeadline:") in the prompt. Without targets the
      labels equal input_ids (plain language modelling).
    - seq2seq: encoder inputs cut to the budget; ``labels`` are the tokenized targets, cut to
      ``max_target_length`` (default: the same budget, since the decoder also carries a prefix).
    """
    texts, targets = _checked(texts, targets, labels, mode)
    budget = _budget(max_length, prefix_tokens)

    def warn(n_cut: int, n_budget: int, where: str = "") -> None:
        _warn_truncated(n_cut, len(texts), n_budget, max_length, prefix_tokens, where)

    if mode == "classification":
        enc, n_cut = _tokenize_truncated(tokenizer, texts, budget)
        if labels is not None:
            enc["labels"] = [int(x) for x in labels]
        warn(n_cut, budget)
        return enc
    if mode == "seq2seq":
        enc, n_cut = _tokenize_truncated(tokenizer, texts, budget)
        if targets is not None:
            t_budget = max_target_length or budget
            enc["labels"], t_cut = _seq2seq_targets(tokenizer, targets, t_budget)
            warn(t_cut, t_budget, " on the target side")
        warn(n_cut, budget)
        return enc
    enc, n_cut = _causal_lm(tokenizer, texts, targets, budget)
    warn(n_cut, budget)
    return enc


def _checked(
    texts: Sequence[str], targets: Sequence[str] | None, labels: Sequence[int] | None, mode: str
) -> tuple[list[str], list[str] | None]:
    texts = list(texts)
    if mode not in ("classification", "causal_lm", "seq2seq"):
        raise PrefixTuneError(f"unknown mode {mode!r}; expected 'classification', 'causal_lm' or 'seq2seq'")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PrefixTuneError(f"text {i} must be a string, got {type(t).__name__}")
    if targets is not None:
        targets = list(targets)
        if len(targets) != len(texts):
            raise PrefixTuneError(f"got {len(texts)} texts but {len(targets)} targets")
    if labels is not None and len(labels) != len(texts):
        raise PrefixTuneError(f"got {len(texts)} texts but {len(labels)} labels")
    return texts, targets


def _seq2seq_targets(tokenizer: Any, targets: list[str], budget: int) -> tuple[list[list[int]], int]:
    """Decoder labels cut to `budget`, and how many had to be cut."""
    tgt = tokenizer(text_target=targets, truncation=False, verbose=False)["input_ids"]
    long_t = [i for i, ids in enumerate(tgt) if len(ids) > budget]
    if long_t:
        cut = tokenizer(text_target=[targets[i] for i in long_t], truncation=True, max_length=budget)["input_ids"]
        for j, i in enumerate(long_t):
            tgt[i] = cut[j]
    return [list(ids) for ids in tgt], len(long_t)


def _causal_lm(tokenizer: Any, texts: list[str], targets: list[str] | None, budget: int) -> tuple[dict, int]:
    """Prompt + target + eos per row, the prompt cut from the left (a leading BOS kept longest)."""
    eos = tokenizer.eos_token_id
    if targets is not None and eos is None:
        raise PrefixTuneError("causal_lm targets need a tokenizer with an eos token")
    prompts = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    specials = set(tokenizer.all_special_ids)
    out_ids, out_labels, n_cut = [], [], 0
    for i, prompt in enumerate(prompts):
        prompt = list(prompt)
        n_lead = 0  # keep a leading BOS when cutting the prompt from the left
        while n_lead < len(prompt) and prompt[n_lead] in specials:
            n_lead += 1
        lead, body = prompt[:n_lead], prompt[n_lead:]
        target = []
        if targets is not None:
            target = list(tokenizer(targets[i], add_special_tokens=False)["input_ids"]) + [eos]
        excess = len(lead) + len(body) + len(target) - budget
        if excess > 0:
            n_cut += 1
            drop = min(excess, len(body))
            body = body[drop:]
            excess -= drop
            if excess > 0:
                drop = min(excess, len(lead))
                lead = lead[drop:]
                excess -= drop
            if excess > 0:
                target = target[: len(target) - excess]
        ids = lead + body + target
        out_ids.append(ids)
        if targets is None:
            out_labels.append(list(ids))
        else:
            out_labels.append([IGNORE_INDEX] * (len(lead) + len(body)) + target)
    enc = {"input_ids": out_ids, "attention_mask": [[1] * len(x) for x in out_ids], "labels": out_labels}
    return enc, n_cut


def to_examples(encoding: dict[str, list]) -> list[dict[str, Any]]:
    """Column-wise encoding (as returned by tokenize_with_budget) to one dict per example for collate."""
    keys = list(encoding)
    n = len(encoding[keys[0]]) if keys else 0
    return [{k: encoding[k][i] for k in keys} for i in range(n)]


def collate(batch: Sequence[dict], pad_token_id: int | None, padding_side: str = "right") -> dict:
    """Pad a list of examples to the batch maximum and stack into tensors.

    Padding per batch (not to max_length) keeps CPU training fast. Labels that are sequences are
    padded with -100 (ignored by the loss) to their own maximum, which for seq2seq differs from the
    input length; scalar labels become a 1-D tensor. Use ``padding_side="left"`` for batched
    generation with decoder-only models, so that every prompt ends at the last position.
    """
    import torch

    if pad_token_id is None:
        raise PrefixTuneError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    if padding_side not in ("left", "right"):
        raise PrefixTuneError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise PrefixTuneError("cannot collate an empty batch")
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [ex[key] for ex in batch]
        if not isinstance(values[0], (list, tuple)):
            out[key] = torch.tensor(values)
            continue
        width = max(len(v) for v in values)
        pad = pad_values.get(key, 0)
        rows = []
        for v in values:
            fill = [pad] * (width - len(v))
            rows.append(list(v) + fill if padding_side == "right" else fill + list(v))
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out
