"""Tiny random models of every supported family, built from configs so tests need no downloads; a word-level
tokenizer over a toy vocabulary; models saved to disk with it, so the CLI can load them like any model folder;
and toy data sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

VOCAB = 96

# BERT-style sizes; DeBERTa and DeBERTa-v2 with both relative-position terms (content-to-position, position-to-content)
ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
DEBERTA = {
    **ENCODER,
    "max_position_embeddings": 64,
    "relative_attention": True,
    "pos_att_type": ["p2c", "c2p"],
    "max_relative_positions": 16,
    "pad_token_id": 0,
}

FAMILIES = {
    "bert": (
        "encoder",
        lambda: tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            type_vocab_size=2,
        ),
    ),
    "roberta": (
        "encoder",
        lambda: tf.RobertaConfig(**ENCODER, max_position_embeddings=70, pad_token_id=1),
    ),
    "distilbert": (
        "encoder",
        lambda: tf.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
        ),
    ),
    # attention modules outside the registry, reached through core/own_attention.py's adapters
    "deberta_v2": (
        "encoder",
        lambda: tf.DebertaV2Config(**DEBERTA, position_buckets=8),
    ),
    "deberta_v3": (  # DeBERTa-v3's settings: shared position keys, layer-normed relative embeddings
        "encoder",
        lambda: tf.DebertaV2Config(**DEBERTA, position_buckets=8, share_att_key=True, norm_rel_ebd="layer_norm"),
    ),
    "deberta": ("encoder", lambda: tf.DebertaConfig(**DEBERTA)),
    "mpnet": (
        "encoder",
        lambda: tf.MPNetConfig(**ENCODER, max_position_embeddings=70, pad_token_id=1),
    ),
    "bloom": (
        "decoder",
        lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0),
    ),
    "falcon": (  # Falcon-7B's layout: multi-query, one key/value head
        "decoder",
        lambda: tf.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0
        ),
    ),
    "falcon_new": (  # Falcon-40B/180B's new decoder layout: grouped keys/values broadcast to every head
        "decoder",
        lambda: tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
            pad_token_id=0,
        ),
    ),
    "gpt2": (
        "decoder",
        lambda: tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "llama": (
        "decoder",
        lambda: tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
    "llama_mqa": (
        "decoder",
        lambda: tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
    "qwen2": (
        "decoder",
        lambda: tf.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
    "gemma3": (
        "decoder",
        lambda: tf.Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            max_position_embeddings=64,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            pad_token_id=0,
        ),
    ),
    "bart": (
        "seq2seq",
        lambda: tf.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        ),
    ),
    "t5": (
        "seq2seq",
        lambda: tf.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            d_ff=64,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    ),
}

CLASSES = {
    "encoder": tf.AutoModelForSequenceClassification,
    "decoder": tf.AutoModelForCausalLM,
    "seq2seq": tf.AutoModelForSeq2SeqLM,
}


def kind(family: str) -> str:
    return FAMILIES[family][0]


def make(family: str, task: str | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    kind, build = FAMILIES[family]
    config = build()
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    cls = tf.AutoModelForSequenceClassification if task == "classification" else CLASSES[kind]
    if cls is tf.AutoModelForSequenceClassification:
        config.num_labels = 3
    model = cls.from_config(config)
    return model.eval()


# ------------------------------------------------------------------ a real tokenizer, saved models, toy data
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "very", "quite", "story", "film", "acting", "really"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["say", "title", ":"]
CHAT_WORDS = ["user", "assistant", "system", ":", "|", ".", ","]  # a chat template of words this vocabulary knows
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def tokenizer(
    kind: str, words: list[str] | None = None, chat_template: str | None = None, bos: bool = False
) -> PreTrainedTokenizerFast:
    """The tests' one real tokenizer: a word per token over `words` (the toy vocabulary by default).

    Encoders wrap a text in [CLS] ... [SEP]; seq2seq ends it with [SEP] (its eos); decoders use
    [CLS]/[SEP] as bos/eos and prepend the bos only with `bos`. Punctuation splits off words.
    """
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + (words or WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = {"encoder": "[CLS] $A [SEP]", "seq2seq": "$A [SEP]"}.get(kind, "[CLS] $A" if bos else None)
    if single:
        specials = [(s, vocab[s]) for s in ("[CLS]", "[SEP]") if s in single]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    if kind == "encoder":
        fast.cls_token, fast.sep_token = "[CLS]", "[SEP]"
    else:
        fast.eos_token, fast.bos_token = "[SEP]", "[CLS]"
    if chat_template:
        fast.chat_template = chat_template
    return fast


def save(family: str, directory: Path, task: str | None = None) -> str:
    """Save tiny `family` (classification head if task says so) plus its tokenizer to `directory`."""
    what = "encoder" if task == "classification" else kind(family)
    ids = {"vocab_size": len(SPECIALS) + len(WORDS), "pad_token_id": 0}
    if what != "encoder":
        ids.update(eos_token_id=3, bos_token_id=2)
    if what == "seq2seq":
        ids.update(decoder_start_token_id=2)
    model = make(family, task=task, **ids)
    if task == "classification":  # save the bare encoder, like MiniLM: loaders add a head of any size
        model = getattr(model, model.base_model_prefix)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer(what).save_pretrained(directory)
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
