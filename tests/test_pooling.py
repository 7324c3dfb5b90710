"""Mean pooling: an encoder's head reads the masked mean of the last hidden states instead of [CLS]."""

from __future__ import annotations

import pytest
import tiny
import torch

from prefixtune import PrefixModel, attach
from prefixtune.core.pooling import trained_pooling
from prefixtune.errors import PrefixTuneError


def _batch() -> dict:
    ids = torch.randint(3, tiny.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_head_reads_the_masked_mean_of_the_last_hidden_states(method):
    model = attach(tiny.make("bert", task="classification"), method=method, num_virtual_tokens=3, pooling="mean")
    kw = _batch()
    with torch.no_grad():
        out = model(**kw, output_hidden_states=True)
        if method == "prompt":  # the soft prompt sits after [CLS] and is attended, so it is averaged too
            mask = torch.cat([kw["attention_mask"][:, :1], torch.ones(3, 3, dtype=torch.long),
                              kw["attention_mask"][:, 1:]], dim=1)  # fmt: skip
        else:
            mask = kw["attention_mask"]
        expected = model.heads["classifier"](_masked_mean(out.hidden_states[-1], mask))
        cls_model = attach(model.base_model, method=method, num_virtual_tokens=3)
        cls_model.prefix.load_state_dict(model.prefix.state_dict())
        cls_model.heads.load_state_dict(model.heads.state_dict())
        cls_logits = cls_model(**kw).logits
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits, cls_logits, atol=1e-3)  # the [CLS] pooler gives other logits


def test_padding_and_the_bare_model_are_unaffected():
    base = tiny.make("bert", task="classification")
    model = attach(base, num_virtual_tokens=3, pooling="mean")
    kw = _batch()
    with torch.no_grad():
        batched = model(**kw).logits
        for row in range(3):
            keep = kw["attention_mask"][row].bool()
            alone = model(input_ids=kw["input_ids"][row : row + 1, keep]).logits[0]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)
        before = base(**kw).logits
        with model.disable_prefix():
            torch.testing.assert_close(model(**kw).logits, before)


def test_pooling_survives_save_and_load(tmp_path):
    model = attach(tiny.make("bert", task="classification"), num_virtual_tokens=3, pooling="mean")
    kw = _batch()
    model.save_pretrained(tmp_path)
    loaded = PrefixModel.from_pretrained(tiny.make("bert", task="classification"), tmp_path)
    assert loaded.prefix_config.pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw).logits, model(**kw).logits)


@pytest.mark.parametrize("family", ["roberta", "mpnet", "deberta_v2"])
def test_first_token_heads_read_the_mean_in_its_place(family):
    """RoBERTa, MPNet and DeBERTa heads read the first token's state: mean pooling puts the mean there."""
    model = attach(tiny.make(family, task="classification"), num_virtual_tokens=3, pooling="mean", init="random")
    kw = _batch()
    with torch.no_grad():
        out = model(**kw, output_hidden_states=True)
        pooled = _masked_mean(out.hidden_states[-1], kw["attention_mask"])[:, None]
        for name in ("pooler", "classifier"):  # DeBERTa's ContextPooler is part of its head
            if name in model.heads:
                pooled = model.heads[name](pooled)
        first = attach(model.base_model, num_virtual_tokens=3)
        first.prefix.load_state_dict(model.prefix.state_dict())
        first.heads.load_state_dict(model.heads.state_dict())
        first_logits = first(**kw).logits
    torch.testing.assert_close(out.logits, pooled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits, first_logits, atol=1e-4)  # the first token alone gives other logits


@pytest.mark.parametrize("family,task", [("llama", None), ("llama", "classification")])
def test_mean_pooling_needs_an_encoder_classifier(family, task):
    with pytest.raises(PrefixTuneError, match="pooling 'mean'.*is no encoder classifier"):
        attach(tiny.make(family, task=task), num_virtual_tokens=2, pooling="mean")
    with pytest.raises(PrefixTuneError, match="pooling must be one of auto, model, mean; got 'max'"):
        attach(tiny.make("bert", task="classification"), num_virtual_tokens=2, pooling="max")


def _sentence_transformers_folder(folder, mean: bool):
    """A tiny BERT saved the way sentence-transformers lays out its folders."""
    tiny.make("bert").save_pretrained(folder)
    (folder / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]'
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        f'{{"pooling_mode_mean_tokens": {str(mean).lower()}, "pooling_mode_cls_token": {str(not mean).lower()}}}'
    )


@pytest.mark.parametrize("mean", [True, False])
def test_auto_follows_the_pooling_a_sentence_encoder_was_trained_with(tmp_path, mean):
    from transformers import AutoModelForSequenceClassification

    _sentence_transformers_folder(tmp_path / "st", mean)
    assert trained_pooling(tmp_path / "st") == ("mean" if mean else "cls")
    model = attach(AutoModelForSequenceClassification.from_pretrained(tmp_path / "st"), num_virtual_tokens=2)
    assert model.prefix_config.pooling == ("mean" if mean else "model")
    model.save_pretrained(tmp_path / "prefix")  # saved resolved: the reload does not depend on the folder
    loaded = PrefixModel.from_pretrained(tiny.make("bert", task="classification"), tmp_path / "prefix")
    assert loaded.prefix_config.pooling == model.prefix_config.pooling


def test_auto_is_the_model_pooler_elsewhere(tmp_path):
    assert attach(tiny.make("bert", task="classification"), num_virtual_tokens=2).prefix_config.pooling == "model"
    assert attach(tiny.make("llama"), num_virtual_tokens=2).prefix_config.pooling == "model"
    (tmp_path / "modules.json").write_text("not json")
    assert trained_pooling(tmp_path) is None and trained_pooling(tmp_path / "absent") is None
