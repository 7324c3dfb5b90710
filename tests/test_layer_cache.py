"""The layer cache: the frozen layers below the prefix replayed from memory give the same numbers."""

from __future__ import annotations

import contextlib

import pytest
import tiny
import torch

from prefixtune import attach, tasks
from prefixtune.core import layer_cache
from prefixtune.errors import PrefixTuneError
from prefixtune.train import TrainConfig, train

ROWS = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in tiny.sentiment_rows(40)]
IDS = {"encoder": {"pad_token_id": 0}, "decoder": {"pad_token_id": 0, "eos_token_id": 3, "bos_token_id": 2}}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def prefixed(family: str, layers: list[int] | None = (2, 3), **overrides):
    kind = "decoder" if tiny.kind(family) == "decoder" else "encoder"
    tok = tiny.tokenizer(kind)
    base = tiny.make(family, task="classification", vocab_size=len(tok), num_hidden_layers=4, **IDS[kind], **overrides)
    return attach(base, num_virtual_tokens=3, layers=None if layers is None else list(layers), seed=1), tok


def logits(model, tok, rows, batch_size: int) -> torch.Tensor:
    """Logits in row order; different batch sizes put each row beside different padding."""
    examples = tasks.encode(model, tok, rows, 32, "{text}", with_targets=False)
    out = torch.empty(len(rows), model.config.num_labels)
    model.eval()
    with torch.no_grad():
        for idx, batch in tasks.batches(examples, batch_size, tok.pad_token_id):
            out[idx] = model(**batch).logits
    return out


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_replayed_layers_give_the_uncached_logits(family):
    model, tok = prefixed(family)
    rows = [*ROWS[:20], {"text": "good", "label": 1}]  # lengths differ: rows meet other padding
    expected = logits(model, tok, rows, batch_size=4)
    with layer_cache.cached_lower_layers(model) as cache:
        filled = logits(model, tok, rows, batch_size=4)
        assert (cache.hits, cache.misses) == (0, 6) and len(cache.rows) == len({r["text"] for r in rows})
        replayed = logits(model, tok, rows, batch_size=7)  # every row cached: all three batches replay
        assert (cache.hits, cache.misses) == (3, 6)
    torch.testing.assert_close(filled, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-5)


def test_the_block_leaves_the_model_as_it_was():
    model, tok = prefixed("bert")
    stack, _ = layer_cache._stack_of(model)
    hooks = [len(m._forward_pre_hooks) for m in (model.base_model, *stack)]
    with layer_cache.cached_lower_layers(model) as outer, layer_cache.cached_lower_layers(model) as inner:
        assert inner is outer  # an enclosing cache is reused, not stacked
        assert "forward" in stack[0].__dict__ and "forward" not in stack[2].__dict__  # only the layers below
    assert all("forward" not in layer.__dict__ for layer in stack)
    assert [len(m._forward_pre_hooks) for m in (model.base_model, *stack)] == hooks


def test_cached_training_equals_uncached_training_without_dropout(tmp_path):
    """Dropout is the one thing the cache changes (its layers run once, in eval mode): without it, same prefix."""
    trained = []
    for cache in (False, True):
        model, tok = prefixed("bert", **NO_DROPOUT)
        cfg = TrainConfig(output_dir=str(tmp_path / str(cache)), epochs=3, batch_size=8, learning_rate=3e-2,
                          eval_every=0, patience=0, progress=False, cache_frozen_layers=cache)  # fmt: skip
        start = {k: v.clone() for k, v in model.state_tensors().items()}
        with layer_cache.cached_lower_layers(model) if cache else contextlib.nullcontext() as outer:
            train(model, tok, ROWS, ROWS[:8], cfg)  # with the cache, train() reuses the enclosing one
        assert outer is None or outer.hits >= 2 * 5  # epochs 2 and 3 (5 batches each) and validation replay
        trained.append(model.state_tensors())
        assert not torch.equal(trained[-1]["prefix"], start["prefix"])
    for name, tensor in trained[0].items():
        torch.testing.assert_close(trained[1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_the_cache_holds_rows_only_as_long_as_their_real_tokens():
    model, tok = prefixed("bert")
    with layer_cache.cached_lower_layers(model) as cache:
        logits(model, tok, ROWS[:8], batch_size=8)
        lengths = {len(tok(r["text"])["input_ids"]) for r in ROWS[:8]}
        assert {t.shape[0] for t in cache.rows.values()} == lengths
        assert cache.nbytes == sum(t.numel() * 4 for t in cache.rows.values())


@pytest.mark.parametrize(
    ("family", "layers", "message"),
    [
        ("bert", None, "needs method 'prefix' with `layers`"),
        ("bert", (0, 3), "the prefix is in layer 0"),
        ("t5", (1,), "not encoder-decoder"),
    ],
)
def test_what_it_cannot_cache_is_refused_by_name(family, layers, message):
    if family == "t5":
        tok = tiny.tokenizer("seq2seq")
        base = tiny.make("t5", vocab_size=len(tok), pad_token_id=0, decoder_start_token_id=0)
        model = attach(base, num_virtual_tokens=2, layers=list(layers))
    else:
        model, _ = prefixed(family, layers)
    with pytest.raises(PrefixTuneError, match=message), layer_cache.cached_lower_layers(model):
        pass


def test_left_padded_rows_are_refused():
    model, tok = prefixed("llama")
    ids = torch.tensor([[0, 0, 5, 6], [4, 5, 6, 7]])
    mask = (ids != 0).long()
    with layer_cache.cached_lower_layers(model), pytest.raises(PrefixTuneError, match="padded on the right"):
        model(input_ids=ids, attention_mask=mask)
