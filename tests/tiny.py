"""Tiny random models of every supported family, built from configs so tests need no downloads."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96

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
        lambda: tf.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=70,
            pad_token_id=1,
        ),
    ),
    "distilbert": (
        "encoder",
        lambda: tf.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
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


class CharTokenizer:
    """Enough of a tokenizer for text-prefix tests on tiny vocabularies."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


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
