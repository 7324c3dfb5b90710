"""Reference scores for a classification prefix: head only (cached features) and TF-IDF."""

from __future__ import annotations

import sys

import pytest
import tiny
import torch

from prefixtune import attach, baselines
from prefixtune.core.pooling import masked_mean
from prefixtune.errors import PrefixTuneError

# The label is decided by one sentiment word among four filler words.
ROWS = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in tiny.sentiment_rows(200)]
TRAIN, EVAL = ROWS[:150], ROWS[150:]
IDS = {"encoder": {"pad_token_id": 0}, "decoder": {"pad_token_id": 0, "eos_token_id": 3, "bos_token_id": 2}}


def prefixed(family: str = "bert", pooling: str = "model"):
    kind = "decoder" if tiny.kind(family) == "decoder" else "encoder"
    tok = tiny.tokenizer(kind)
    base = tiny.make(family, task="classification", vocab_size=len(tok), **IDS[kind])
    return attach(base, num_virtual_tokens=3, pooling=pooling), tok


def scores(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


# ------------------------------------------------------------------------------------ head only
def test_head_only_learns_a_task_decided_by_one_token():
    model, tok = prefixed(pooling="mean")
    result = baselines.head_only(model, tok, TRAIN, EVAL)
    assert result["accuracy"] >= 0.75 and result["macro_f1"] >= 0.7, result
    assert result["trainable"] == 32 * 3 + 3  # the tiny BERT head: Linear(32, 3)
    assert result["train_rows"] == len(TRAIN) and result["seconds"] > 0


@pytest.mark.parametrize("training", [True, False])
def test_head_only_leaves_the_model_its_head_mode_and_rng_untouched(training):
    model, tok = prefixed()
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    baselines.head_only(model, tok, TRAIN[:64], EVAL[:16], epochs=2)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training is training and all(m.training is training for m in model.modules())
    assert all(p.requires_grad for p in model.heads.parameters())
    assert not any(p.requires_grad for p in model.base_model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_head_only_is_deterministic(family):
    model, tok = prefixed(family)
    first = baselines.head_only(model, tok, TRAIN[:96], EVAL, epochs=3, seed=1)
    assert scores(first) == scores(baselines.head_only(model, tok, TRAIN[:96], EVAL, epochs=3, seed=1))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_probe_head_trains_the_models_own_head_on_what_it_reads_with_the_prefix(family):
    from prefixtune import tasks

    model, tok = prefixed(family, pooling="mean")
    base_head = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    before = tasks.evaluate(model, tok, TRAIN)["accuracy"]
    rng = torch.get_rng_state()
    probe = baselines.probe_head(model, tok, TRAIN, seed=1)
    assert probe >= 0.75 and probe > before + 0.2  # the head alone learned the one-word task
    # The vectors were the model's own (prefix on): the model now scores what the probe scored.
    assert tasks.evaluate(model, tok, TRAIN)["accuracy"] == pytest.approx(probe)
    assert all(torch.equal(v, model.base_model.state_dict()[k]) for k, v in base_head.items())  # frozen, shared
    assert torch.equal(rng, torch.get_rng_state())


def test_probe_head_refuses_labels_outside_the_head():
    model, tok = prefixed()
    with pytest.raises(PrefixTuneError, match=r"labels \[7\] are outside 0..2"):
        baselines.probe_head(model, tok, [{"text": "good", "label": 7}])


def _head_input(model, enc) -> torch.Tensor:
    """Run the real model (prefix off) on one unpadded row; return what its head module receives."""
    name = "pre_classifier" if "pre_classifier" in model.head_modules else model.head_modules[0]
    seen = []
    model.eval()  # attach leaves the model in training mode: dropout would blur the reference
    hook = getattr(model.base_model, name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad(), model.disable_prefix():
        model(**enc)
    hook.remove()
    return seen[0][0]


@pytest.mark.parametrize(
    ("family", "reads"),
    [("bert", "pooled"), ("distilbert", "first token"), ("roberta", "first token"), ("llama", "last token")],
)
def test_features_are_what_the_head_reads_in_a_real_forward(family, reads):
    model, tok = prefixed(family)
    rows = EVAL[:12] + [{"text": "good"}, {"text": "the movie was quite a boring film and plot"}]  # mixed lengths
    feats = baselines.head_features(model, tok, rows, batch_size=5)  # batched and padded
    for row, feat in zip(rows, feats, strict=True):
        x = _head_input(model, tok(row["text"], return_tensors="pt"))
        expected = {"pooled": x, "first token": x[:1], "last token": x[-1]}[reads] if x.dim() == 2 else x
        torch.testing.assert_close(feat, expected, atol=1e-5, rtol=1e-4)


def test_mean_pooling_features_are_the_masked_mean_of_the_bare_backbone():
    model, tok = prefixed(pooling="mean")
    feats = baselines.head_features(model, tok, EVAL, batch_size=7)
    enc = tok([r["text"] for r in EVAL], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        hidden = model.base_model.bert(**enc).last_hidden_state
    torch.testing.assert_close(feats, masked_mean(hidden, enc["attention_mask"]), atol=1e-5, rtol=1e-4)


def test_head_only_refuses_bad_rows_and_models():
    model, tok = prefixed()
    with pytest.raises(PrefixTuneError, match="training rows are empty"):
        baselines.head_only(model, tok, [], EVAL)
    with pytest.raises(PrefixTuneError, match="evaluation rows are empty"):
        baselines.head_only(model, tok, TRAIN, [])
    with pytest.raises(PrefixTuneError, match="training row 1 has no 'text' or no 'label'"):
        baselines.head_only(model, tok, [TRAIN[0], {"text": "good"}], EVAL)
    with pytest.raises(PrefixTuneError, match="class indices"):
        baselines.head_only(model, tok, [{"text": "good", "label": "pos"}], EVAL)
    with pytest.raises(PrefixTuneError, match=r"labels \[7\] are outside 0..2"):
        baselines.head_only(model, tok, [{"text": "good", "label": 7}], EVAL)
    with pytest.raises(PrefixTuneError, match="classification PrefixModel .* got BertForSequenceClassification"):
        baselines.head_only(model.base_model, tok, TRAIN, EVAL)
    lm = attach(tiny.make("gpt2"), num_virtual_tokens=2)
    with pytest.raises(PrefixTuneError, match="got a PrefixModel for task 'causal_lm'"):
        baselines.head_only(lm, tok, TRAIN, EVAL)


def test_head_only_names_a_head_it_cannot_train():
    tok = tiny.tokenizer("encoder")
    base = tiny.make("bert", task="classification", vocab_size=len(tok))
    model = attach(base, num_virtual_tokens=2, head_modules=["classifier", "dropout"])
    with pytest.raises(PrefixTuneError, match=r"heads \['classifier', 'dropout'\] together; supported: one head"):
        baselines.head_only(model, tok, TRAIN, EVAL)


class LastTokenHead(torch.nn.Module):
    """A custom head reading the last position: not the first token a RoBERTa-style head reads."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Linear(32, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(features[:, -1])


def test_head_only_refuses_a_head_whose_logits_its_features_do_not_explain():
    tok = tiny.tokenizer("encoder")
    base = tiny.make("roberta", task="classification", vocab_size=len(tok), pad_token_id=0)
    base.classifier = LastTokenHead()
    model = attach(base, num_virtual_tokens=2)
    with pytest.raises(PrefixTuneError, match=r"not its head \['classifier'\] applied to the vector it reads"):
        baselines.head_only(model, tok, TRAIN, EVAL)


# ---------------------------------------------------------------------------------------- tfidf
def test_tfidf_learns_a_toy_task_and_tunes_c_on_validation_only():
    plain = baselines.tfidf(TRAIN[:100], EVAL)
    assert plain["accuracy"] >= 0.9 and plain["C"] == 1.0 and plain["train_rows"] == 100
    tuned = baselines.tfidf(TRAIN[:100], EVAL, validation_rows=TRAIN[100:])
    assert tuned["C"] in baselines.C_GRID and tuned["accuracy"] >= 0.9
    assert scores(tuned) == scores(baselines.tfidf(TRAIN[:100], EVAL, validation_rows=TRAIN[100:]))


def test_tfidf_errors_clearly():
    with pytest.raises(PrefixTuneError, match="training rows are empty"):
        baselines.tfidf([], EVAL)
    with pytest.raises(PrefixTuneError, match="evaluation rows are empty"):
        baselines.tfidf(TRAIN, [])
    with pytest.raises(PrefixTuneError, match="evaluation row 0 has no 'text' or no 'label'"):
        baselines.tfidf(TRAIN, [{"text": "good"}])


def test_tfidf_without_scikit_learn_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    with pytest.raises(PrefixTuneError, match=r"pip install 'prefixtune\[baselines\]'"):
        baselines.tfidf(TRAIN, EVAL)


# ------------------------------------------------------------------------------- beside a trained prefix
def test_cli_train_reports_the_baselines_beside_the_prefix_in_the_table_and_test_metrics(tmp_path, capsys):
    import json

    from prefixtune import cli

    bert = tiny.save("bert", tmp_path / "bert", task="classification")
    files = {}
    for split, (n, seed) in {"train": (48, 0), "validation": (12, 1), "test": (16, 2)}.items():
        files[split] = tiny.write_jsonl(tmp_path / f"{split}.jsonl", tiny.sentiment_rows(n, seed=seed))
    out = tmp_path / "out"
    argv = ["train", "--model", bert, "--train-file", files["train"], "--validation-file", files["validation"],
            "--test-file", files["test"], "--output-dir", out, "--max-steps", "4", "--no-progress",
            "--num-virtual-tokens", "2", "--max-length", "32", "--baseline", "head,tfidf"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy beside the baselines (16 rows)" in printed and "head only" in printed
    saved = json.loads((out / "test_metrics.json").read_text())
    assert set(saved["baselines"]) == {"head_only", "tfidf"}
    for found in saved["baselines"].values():
        assert 0 <= found["accuracy"] <= 1 and found["train_rows"] == 48


def test_cli_refuses_an_unknown_baseline_before_training(tmp_path, capsys):
    from prefixtune import cli

    code = cli.main(["train", "--model", "minilm", "--dataset", "rotten_tomatoes", "--baseline", "bow",
                     "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and "unknown baseline(s) ['bow']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
