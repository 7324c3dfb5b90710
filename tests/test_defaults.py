"""Defaults sized to the data: the step budget, early stopping on validation, measured learning rates,
and the validation part held out of the training rows when none is given."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from test_train import CLS_ROWS, classifier

from prefixtune import cli
from prefixtune.errors import PrefixTuneError
from prefixtune.splits import hold_out
from prefixtune.train import TrainConfig, defaults, train


# ------------------------------------------------------------------------------------ step budget
def test_small_data_gets_the_minimum_step_budget_large_data_five_epochs():
    assert defaults.budget(steps_per_epoch=50, epochs=None, max_steps=None) == defaults.MIN_STEPS  # 20 epochs
    assert defaults.budget(steps_per_epoch=636, epochs=None, max_steps=None) == 5 * 636  # Rotten Tomatoes, batch 16
    assert defaults.budget(steps_per_epoch=50, epochs=4, max_steps=None) == 200  # epochs given: as asked
    assert defaults.budget(steps_per_epoch=50, epochs=4, max_steps=7) == 7  # max_steps wins


@pytest.mark.parametrize(
    ("method", "reparam", "task", "rate"),
    [
        ("prefix", "none", "classification", 3e-2),
        ("prefix", "mlp", "causal_lm", 1e-3),
        ("prompt", "none", "classification", 1e-2),
        ("prompt", "none", "causal_lm", 1e-1),
        ("text", "none", "classification", 1e-2),
    ],
)
def test_learning_rate_defaults_follow_the_method_and_task(method, reparam, task, rate):
    assert defaults.learning_rate(method, reparam, task) == rate


def test_a_small_classification_set_trains_the_prefix_through_the_mlp_and_nothing_else_does():
    small = defaults.SMALL_CLASSIFICATION_ROWS - 1
    assert defaults.reparameterisation("prefix", "classification", small) == "mlp"
    assert defaults.reparameterisation("prefix", "classification", small + 1) == "none"  # 4,000 rows: direct led
    assert defaults.reparameterisation("prefix", "causal_lm", small) == "none"  # 640 BBC articles: direct led
    assert defaults.reparameterisation("prompt", "classification", small) == "none"  # nothing to reparameterise


def test_cli_sizes_an_unset_reparam_to_the_data_says_so_and_keeps_a_set_one(tmp_path, capsys):
    bert = tiny.save("bert", tmp_path / "bert", task="classification")
    data = tiny.write_jsonl(tmp_path / "rows.jsonl", tiny.sentiment_rows(24))
    common = {"model": bert, "train_file": data, "validation_file": data, "max_steps": 2, "num_virtual_tokens": 2,
              "max_length": 32, "progress": False, "baseline": ["none"]}  # fmt: skip
    for given, expected in ((None, "mlp"), ("none", "none")):
        out = tmp_path / f"reparam-{given}"
        result = cli.train(**common, output_dir=str(out), reparam=given)
        assert json.loads((out / "prefixtune_config.json").read_text())["prefix"]["reparam"] == expected
        assert result.config.learning_rate == defaults.learning_rate("prefix", expected, "classification")
        said = "note: 24 training rows, fewer than 1,000: the prefix trains through the MLP" in capsys.readouterr().err
        assert said == (given is None)


def test_unset_defaults_are_filled_from_the_data_and_stop_early_on_validation(tmp_path):
    model, tok = classifier()
    config = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=8, max_length=32, progress=False)
    assert config.epochs is None and config.learning_rate is None
    # A rate this small cannot improve validation accuracy, so patience ends the run after 3 evaluations.
    config.learning_rate = 1e-12
    result = train(model, tok, CLS_ROWS, CLS_ROWS[:8], config)
    used = result.config
    assert used.max_steps == defaults.MIN_STEPS  # 40 rows / batch 8 = 5 steps an epoch: far below 1000
    assert used.eval_every == defaults.MIN_STEPS // defaults.EVALUATIONS and used.patience == defaults.PATIENCE
    assert result.stopped_early and result.steps == (defaults.PATIENCE + 1) * used.eval_every
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"]  # fmt: skip
    assert [r["step"] for r in evals] == [100, 200, 300, 400]
    saved = json.loads((tmp_path / "run" / "prefixtune_train.json").read_text())["train_config"]
    assert saved["max_steps"] == 1000 and saved["learning_rate"] == 1e-12  # what ran is recorded


def test_without_validation_nothing_stops_early_and_the_measured_rate_is_used(tmp_path):
    model, tok = classifier()
    config = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=8, max_length=32, progress=False, max_steps=3)
    result = train(model, tok, CLS_ROWS, None, config)
    assert result.config.patience == 0 and result.config.learning_rate == 3e-2 and result.steps == 3


# ---------------------------------------------------------------------------------- carve-out
def _rows(n: int, groups: int) -> list[dict]:
    return [{"text": f"row {i}", "label": i % 2, "group": f"g{i % groups}"} for i in range(n)]


def test_hold_out_puts_no_row_in_both_parts_and_is_seeded():
    rows = _rows(200, 200)
    train_rows, val = hold_out(rows, seed=3)
    assert len(val) == 20 and len(train_rows) == 180
    assert not {r["text"] for r in train_rows} & {r["text"] for r in val}
    assert hold_out(rows, seed=3) == (train_rows, val) and hold_out(rows, seed=4)[1] != val


def test_hold_out_keeps_groups_whole():
    rows = _rows(300, 30)
    train_rows, val = hold_out(rows, seed=0, group_key="group")
    assert not {r["group"] for r in train_rows} & {r["group"] for r in val}
    assert len(train_rows) + len(val) == 300 and 0 < len(val) < 60


def test_hold_out_refuses_what_cannot_be_split():
    with pytest.raises(PrefixTuneError, match="cannot hold out a validation part of 10% from 3 rows"):
        hold_out(_rows(3, 3), seed=0)
    with pytest.raises(PrefixTuneError, match="1 groups"):
        hold_out(_rows(20, 1), seed=0, group_key="group")
    with pytest.raises(PrefixTuneError, match="no group value"):
        hold_out([{"text": "a", "label": 0}] * 20, seed=0, group_key="group")


def test_cli_without_validation_file_holds_out_whole_groups_and_says_so(tmp_path, capsys, monkeypatch):
    bert = tiny.save("bert", tmp_path / "bert", task="classification")
    rows = [dict(r, author=f"a{i % 12}") for i, r in enumerate(tiny.sentiment_rows(60))]
    data = tiny.write_jsonl(tmp_path / "train.jsonl", rows)
    seen: list[list[dict]] = []
    from prefixtune import train as train_module

    original = train_module.Trainer.__init__

    def spy(self, model, tokenizer, train_rows, eval_rows, config, info=None):
        seen.extend([list(train_rows), list(eval_rows)])
        original(self, model, tokenizer, train_rows, eval_rows, config, info)

    monkeypatch.setattr(train_module.Trainer, "__init__", spy)
    code = cli.main(["train", "--model", bert, "--train-file", data, "--group-column", "author",
                     "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--no-progress",
                     "--num-virtual-tokens", "2", "--max-length", "32"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "no validation data given; held out" in err and "whole 'author' groups" in err
    fit, val = seen
    assert len(fit) + len(val) == 60 and val
    scored = json.loads((tmp_path / "out" / "validation_baselines.json").read_text())  # no test split: validation
    assert 0 <= scored["accuracy"] <= 1 and scored["baselines"]["head_only"]["train_rows"] == len(fit)
    assert not {r["group"] for r in fit} & {r["group"] for r in val}


# --------------------------------------------------------------------------------- head warm start
def test_head_init_probe_starts_training_from_a_probed_head_and_only_for_classifiers(tmp_path, monkeypatch):
    from test_train import cfg, lm

    from prefixtune import baselines

    calls = []
    real = baselines.probe_head
    monkeypatch.setattr(baselines, "probe_head", lambda *a, **k: calls.append(k) or real(*a, **k))
    model, tok = classifier()
    heads = {k: v.clone() for k, v in model.heads.state_dict().items()}
    # A learning rate of ~0 leaves the head where the probe put it: training started from the probed head.
    result = train(model, tok, CLS_ROWS, None, cfg(tmp_path, head_init="probe", max_steps=1, learning_rate=1e-12))
    assert len(calls) == 1 and calls[0]["seed"] == result.config.seed
    assert any(not torch.equal(v, model.heads.state_dict()[k]) for k, v in heads.items())
    model, tok = classifier()
    train(model, tok, CLS_ROWS, None, cfg(tmp_path, "plain", max_steps=1, learning_rate=1e-12))
    assert len(calls) == 1  # head_init "random" (the default) probes nothing
    assert all(torch.allclose(v, model.heads.state_dict()[k]) for k, v in heads.items())
    model, tok = lm()
    with pytest.raises(PrefixTuneError, match="head_init 'probe' trains a classifier's head"):
        train(model, tok, [{"text": "a b c"}] * 4, None, cfg(tmp_path, "lm", head_init="probe", max_steps=1))
    with pytest.raises(PrefixTuneError, match="head_init must be one of random, probe; got 'linear'"):
        TrainConfig(head_init="linear")
