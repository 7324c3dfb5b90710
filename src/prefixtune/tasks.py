"""What a trained prefix is *for*: loading the right model class, encoding rows, evaluating, predicting, generating.

The training loop, the CLI and the demo all go through these functions, so "how a classification
row becomes tensors" or "how a causal-LM prompt is cut to the prefix budget" is written once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from prefixtune import serialization
from prefixtune.assets import resolve_model
from prefixtune.data import IGNORE_INDEX, collate, decode_utf8, to_examples, tokenize_with_budget
from prefixtune.errors import PrefixTuneError, first_line
from prefixtune.metrics import classification_metrics, generation_metrics

TRAIN_INFO = "prefixtune_train.json"  # what the CLI needs to reuse a prefix: base model, labels, template
MODES = {"classification": "classification", "causal_lm": "causal_lm", "seq2seq_lm": "seq2seq"}
# Their position ids start after the pad index, so pad_token_id + 1 of the table can never hold a token.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer")


# ----------------------------------------------------------------------------------- models
def load_model(
    name: str, task: str = "auto", num_labels: int | None = None, label_names: Sequence[str] | None = None
) -> tuple[torch.nn.Module, Any, str]:
    """Load `(model, tokenizer, task)` for an alias ('minilm', 'smollm2'), a local folder or a hub name.

    The model class follows the task, so a classifier gets a (new) head with the right number of
    labels and an encoder-decoder gets its LM head; 'auto' picks seq2seq/causal LM from the config.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    path = resolve_model(name)
    try:
        # Never remote code: a model folder's own Python is not run (and not even offered in a prompt).
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise PrefixTuneError(
            f"cannot load model {name!r}: {first_line(exc)}; give 'minilm', 'smollm2', a local model folder, "
            "or a hub name (needs the network)"
        ) from None
    if task == "auto":
        task = "seq2seq_lm" if config.is_encoder_decoder else "causal_lm"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PrefixTuneError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected here
    try:
        if task == "classification":
            if not num_labels or num_labels < 2:
                raise PrefixTuneError(f"classification needs at least 2 labels, got {num_labels}")
            names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)},
                ignore_mismatched_sizes=True,  # a head of another size is replaced: the prefix trains its own
                dtype=torch.float32,
                trust_remote_code=False,
            )
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
        elif task == "seq2seq_lm":
            model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
        elif task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
        else:
            raise PrefixTuneError(f"unknown task {task!r}; expected classification, causal_lm or seq2seq_lm")
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer, task


def max_positions(model: torch.nn.Module) -> int | None:
    """Longest input the base model's position table allows (None: relative positions, no hard limit)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in PADDING_OFFSET_POSITIONS:
                value -= (config.pad_token_id or 0) + 1
            return value
    return None


def length_budget(model: Any, max_length: int) -> int:
    """`min(max_length, model positions)`: the total that input plus prefix may take."""
    limit = max_positions(model)
    return min(max_length, limit) if limit else max_length


# --------------------------------------------------------------------------------- encoding
def prompts(rows: Sequence[dict], template: str) -> list[str]:
    """Fill `template` ('{text}' marks the row's text) for every row."""
    if "{text}" not in template:
        raise PrefixTuneError(f"the prompt template {template!r} must contain {{text}}")
    return [template.replace("{text}", row["text"]) for row in rows]


def _lm_target(prompt: str, target: str) -> str:
    """A causal-LM target continues the prompt: a separating space unless the prompt ends in whitespace."""
    target = target.strip()
    return target if not prompt or prompt[-1].isspace() else " " + target


def encode(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    max_length: int,
    template: str = "{text}",
    max_target_length: int | None = None,
    with_targets: bool = True,
    reserve: int = 0,
) -> list[dict]:
    """Rows -> unpadded examples for `collate`, cut so prefix + input fits the model.

    `reserve` keeps room for tokens a causal LM will generate after the prompt.
    """
    mode = MODES.get(model.task)
    if mode is None:
        raise PrefixTuneError(f"cannot train or evaluate a prefix for task {model.task!r}")
    if not rows:
        raise PrefixTuneError("the data set is empty (no rows)")
    if "messages" in rows[0]:
        return _encode_chat(model, tokenizer, rows, length_budget(model, max_length) - reserve, with_targets)
    texts = prompts(rows, template)
    budget = length_budget(model, max_length) - reserve
    kwargs: dict[str, Any] = {"mode": mode}
    if mode == "classification" and with_targets:
        if any("label" not in r for r in rows):
            raise PrefixTuneError("classification rows need a label (set --label-column)")
        kwargs["labels"] = [int(r["label"]) for r in rows]
    elif mode != "classification" and with_targets:
        if any("target" not in r for r in rows):
            raise PrefixTuneError(f"{model.task} rows need a target text (set --target-column)")
        targets = [r["target"] for r in rows]
        kwargs["targets"] = (
            [_lm_target(p, t) for p, t in zip(texts, targets, strict=True)] if mode == "causal_lm" else targets
        )
        kwargs["max_target_length"] = max_target_length
    enc = tokenize_with_budget(tokenizer, texts, budget, model.positions_used, **kwargs)
    if mode == "causal_lm" and not with_targets:
        enc.pop("labels", None)
    return to_examples(enc)


def _encode_chat(model: Any, tokenizer: Any, rows: Sequence[dict], max_length: int, with_targets: bool) -> list[dict]:
    """Conversations through the tokenizer's chat template (see `chat.py`): learnt turns, or prompts to answer."""
    from prefixtune import chat

    if model.task != "causal_lm":
        raise PrefixTuneError(f"chat data trains a decoder (causal_lm); this prefix is for {model.task}")
    if any("messages" not in r for r in rows):
        raise PrefixTuneError("a data set mixes conversations with plain text rows; use one format")
    budget = max_length - model.positions_used
    if with_targets:
        return chat.encode(tokenizer, rows, budget)
    examples = []
    for row in rows:  # the conversation so far, ending in the template's assistant opening
        ids = tokenizer(chat.generation_prompt(tokenizer, row["messages"]), add_special_tokens=False)["input_ids"]
        ids = list(ids)[-budget:]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return examples


def conversation_to_answer(row: dict) -> tuple[list[dict], str]:
    """A chat row as (the turns before its last assistant turn, that turn's text): a generation reference."""
    last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
    return row["messages"][:last], row["messages"][last]["content"]


def batches(
    examples: Sequence[dict], batch_size: int, pad_token_id: int, padding_side: str = "right"
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Length-sorted batches (little padding, so CPU evaluation is fast) with their original indices."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, collate([examples[i] for i in idx], pad_token_id, padding_side)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off inside the block; the caller's train/eval mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(model: torch.nn.Module, bf16: bool) -> Any:
    return torch.autocast(device_of(model).type, dtype=torch.bfloat16, enabled=bf16)


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def classify(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    max_length: int = 128,
    batch_size: int = 64,
    template: str = "{text}",
    bf16: bool = False,
) -> tuple[list[list[float]], float | None]:
    """Class probabilities for every row, plus the mean loss when every row has a label."""
    with eval_mode(model):
        return _classify(model, tokenizer, rows, max_length, batch_size, template, bf16)


def _classify(
    model: Any, tokenizer: Any, rows: Sequence[dict], max_length: int, batch_size: int, template: str, bf16: bool
) -> tuple[list[list[float]], float | None]:
    with_labels = all("label" in r for r in rows)
    examples = encode(model, tokenizer, rows, max_length, template, with_targets=with_labels)
    probs: list[list[float]] = [[] for _ in rows]
    loss_sum = 0.0
    for idx, batch in batches(examples, batch_size, tokenizer.pad_token_id):
        with _autocast(model, bf16):
            out = model(**to_device(batch, device_of(model)))
        if with_labels:
            loss_sum += float(out.loss) * len(idx)
        for i, p in zip(idx, out.logits.float().softmax(-1).tolist(), strict=True):
            probs[i] = p
    return probs, (loss_sum / len(rows) if with_labels else None)


@torch.no_grad()
def lm_loss(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    max_length: int = 128,
    batch_size: int = 32,
    template: str = "{text}",
    max_target_length: int | None = None,
    bf16: bool = False,
) -> float:
    """Mean per-token cross-entropy on the target tokens (teacher forcing)."""
    examples = encode(model, tokenizer, rows, max_length, template, max_target_length)
    total, count = 0.0, 0
    for _, batch in batches(examples, batch_size, tokenizer.pad_token_id):
        with eval_mode(model), _autocast(model, bf16):
            out = model(**to_device(batch, device_of(model)))
        labels = batch["labels"]
        n = int((labels[:, 1:] if model.task == "causal_lm" else labels).ne(IGNORE_INDEX).sum())
        total, count = total + float(out.loss) * n, count + n
    return total / max(count, 1)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str | list[dict]],
    max_length: int = 512,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    template: str = "{text}",
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    bf16: bool = False,
) -> list[str]:
    """Generated continuations (causal LM) or outputs (seq2seq) for every text, in input order."""
    if model.task not in ("causal_lm", "seq2seq_lm"):
        raise PrefixTuneError(f"generate needs a causal_lm or seq2seq_lm prefix, this one is for {model.task}")
    rows = [{"messages": t} if isinstance(t, list) else {"text": t} for t in texts]  # a list: turns to answer
    causal = model.task == "causal_lm"
    examples = encode(
        model, tokenizer, rows, max_length, template, with_targets=False, reserve=max_new_tokens if causal else 0
    )
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample)
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    options["pad_token_id"] = tokenizer.pad_token_id
    outputs: list[str] = [""] * len(rows)
    for idx, batch in batches(examples, batch_size, tokenizer.pad_token_id, "left" if causal else "right"):
        batch = to_device(batch, device_of(model))
        with eval_mode(model), _autocast(model, bf16):
            ids = model.generate(**batch, **options)
        if causal:
            ids = ids[:, batch["input_ids"].shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True), strict=True):
            outputs[i] = text.strip()
    return outputs


def evaluate(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    max_length: int = 128,
    batch_size: int = 64,
    template: str = "{text}",
    max_target_length: int | None = None,
    max_new_tokens: int = 32,
    with_generation: bool = True,
    bf16: bool = False,
) -> dict[str, float]:
    """Metrics on labelled rows: loss, accuracy, macro-F1 (classification) or loss, ROUGE, BLEU (generation)."""
    if model.task == "classification":
        probs, loss = classify(model, tokenizer, rows, max_length, batch_size, template, bf16)
        preds = [max(range(len(p)), key=p.__getitem__) for p in probs]
        return {"loss": float(loss or 0.0), **classification_metrics(preds, [int(r["label"]) for r in rows])}
    metrics = {"loss": lm_loss(model, tokenizer, rows, max_length, batch_size, template, max_target_length, bf16)}
    metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    if with_generation:
        pairs = [conversation_to_answer(r) if "messages" in r else (r["text"], r["target"]) for r in rows]
        outputs = generate(
            model, tokenizer, [p for p, _ in pairs], max_length, max_new_tokens, batch_size, template, bf16=bf16
        )
        metrics.update(generation_metrics(outputs, [t for _, t in pairs]))
    return metrics


def predict(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    label_names: Sequence[str] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
    template: str = "{text}",
    **generate_options: Any,
) -> list[dict]:
    """One record per text: `{text, label, score}` for a classifier, `{text, output}` for a generator."""
    texts = list(texts)
    if not texts:
        raise PrefixTuneError("nothing to predict: the input holds no texts")
    if model.task != "classification":
        outputs = generate(
            model, tokenizer, texts, max_length, batch_size=batch_size, template=template, **generate_options
        )
        return [{"text": t, "output": o} for t, o in zip(texts, outputs, strict=True)]
    probs, _ = classify(model, tokenizer, [{"text": t} for t in texts], max_length, batch_size, template)
    names = list(label_names) if label_names else [str(i) for i in range(len(probs[0]))]
    records = []
    for text, p in zip(texts, probs, strict=True):
        best = max(range(len(p)), key=p.__getitem__)
        records.append({"text": text, "label": names[best], "score": round(p[best], 6)})
    return records


# ------------------------------------------------------------------------------- input/output
def read_texts(source: str | None, text_column: str = "text") -> list[str]:
    """Texts to predict: a CSV/JSON/JSONL file (its text column), a .txt file, or stdin ('-'/None), one per line."""
    from prefixtune.data import read_table

    if source and source != "-" and Path(source).suffix.lower() not in (".txt", ""):
        return [r["text"] for r in read_table(source, text_column, None)]
    if source and source != "-":
        if not Path(source).is_file():
            raise PrefixTuneError(f"{source}: file not found")
        raw = Path(source).read_bytes()
    else:
        raw = sys.stdin.buffer.read()
    text = decode_utf8(source or "stdin", raw)
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line]


def format_records(records: Iterable[dict], fmt: str) -> str:
    """Records as JSONL (one object per line) or CSV with a header."""
    records = list(records)
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else ["text"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()
    raise PrefixTuneError(f"unknown output format {fmt!r}; expected jsonl or csv")


def write_records(records: Iterable[dict], output: str | None, fmt: str | None = None) -> None:
    """Write predictions atomically to `output` (format from its suffix unless given), or to stdout."""
    if fmt is None:
        fmt = "csv" if output and Path(output).suffix.lower() in (".csv", ".tsv") else "jsonl"
    payload = format_records(records, fmt)
    if output and output != "-":
        serialization.write_bytes(output, payload.encode("utf-8"))
    else:
        sys.stdout.write(payload)
        sys.stdout.flush()


# ------------------------------------------------------------------------------ saved prefixes
def read_train_info(directory: str | Path) -> dict:
    """The training record next to a prefix (base model, labels, template); {} for a bare prefix."""
    path = Path(directory) / TRAIN_INFO
    if not path.is_file():
        return {}
    return serialization.read_json_object(path)


def load_prefix(directory: str | Path, model_name: str | None = None) -> tuple[Any, Any, dict]:
    """Load a saved prefix onto its base model: `(prefix_model, tokenizer, train_info)`.

    The base model comes from `model_name` or, when omitted, from the training record; label names
    and the head size come from the record or the saved head tensors.
    """
    from prefixtune import hub
    from prefixtune.model import PrefixModel

    directory = hub.resolve(directory)  # a folder, or a hub id
    record = serialization.read_config(directory)
    info = read_train_info(directory)
    name = model_name or info.get("model")
    if not name:
        raise PrefixTuneError(f"{directory} does not say which base model it was trained on: pass --model")
    task = record.get("task", "auto")
    labels = info.get("label_names")
    num_labels = len(labels) if labels else None
    if task == "classification" and num_labels is None:
        tensors = serialization.read_tensors(directory)
        biases = [v for k, v in tensors.items() if k.startswith("head.") and k.endswith(".bias")]
        num_labels = int(biases[-1].shape[0]) if biases else None
    base, tokenizer, task = load_model(name, task, num_labels, labels)
    model = PrefixModel.from_pretrained(base, directory, tokenizer=tokenizer)
    return model, tokenizer, info
