"""Tiny models saved to disk *with a real tokenizer*, so the CLI can load them like any model folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import tiny
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "very", "quite", "story", "film", "acting", "really"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["say", "title", ":"]


def tokenizer(kind: str) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    elif kind == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    if kind == "encoder":
        fast.cls_token, fast.sep_token = "[CLS]", "[SEP]"
    else:
        fast.eos_token, fast.bos_token = "[SEP]", "[CLS]"
    return fast


def save(family: str, directory: Path, task: str | None = None) -> str:
    """Save tiny `family` (classification head if task says so) plus its tokenizer to `directory`."""
    kind = "encoder" if task == "classification" else tiny.kind(family)
    ids = {"vocab_size": len(SPECIALS) + len(WORDS), "pad_token_id": 0}
    if kind != "encoder":
        ids.update(eos_token_id=3, bos_token_id=2)
    if kind == "seq2seq":
        ids.update(decoder_start_token_id=2)
    model = tiny.make(family, task=task, **ids)
    if task == "classification":  # save the bare encoder, like MiniLM: loaders add a head of any size
        model = getattr(model, model.base_model_prefix)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer(kind).save_pretrained(directory)
    return str(directory)


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        word = rng.choice(POSITIVE if label else NEGATIVE)
        words = rng.sample(FILLER, 4) + [word]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def copy_rows(n: int, seed: int = 0) -> list[dict]:
    """Generation toy task: the target is the one sentiment word hidden in the text."""
    rows = []
    for row in sentiment_rows(n, seed):
        word = next(w for w in row["text"].split() if w in POSITIVE + NEGATIVE)
        rows.append({"text": row["text"], "target": word})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Rows as a JSONL data file, the way a user hands them to `prefixtune train`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)
