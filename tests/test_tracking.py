"""Experiment trackers through Accelerate's `log_with`: TensorBoard, offline, on a tiny classifier.

The event file must hold the very numbers metrics.jsonl holds (same steps, same values), the run's
settings must reach the tracker, an unknown tracker is refused by name, and `none` writes no events.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import tiny
import yaml

from prefixtune import attach
from prefixtune.errors import PrefixTuneError
from prefixtune.train import TrainConfig, tracking, train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROWS = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in tiny.sentiment_rows(24)]


def classifier():
    tok = tiny.tokenizer("encoder")
    return attach(tiny.make("bert", task="classification", vocab_size=len(tok)), num_virtual_tokens=3), tok


def config(tmp_path: Path, **kw) -> TrainConfig:
    kw = {"max_steps": 6, "batch_size": 8, "eval_every": 3, "log_every": 2, "patience": 0, **kw}
    return TrainConfig(output_dir=str(tmp_path / "run"), progress=False, max_length=32, **kw)


def records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def event_files(root: Path) -> list[Path]:
    return sorted(root.rglob("events.out.tfevents.*"))


def test_tensorboard_holds_every_metrics_line_and_the_settings(tmp_path):
    model, tok = classifier()
    train(model, tok, ROWS, ROWS[:8], config(tmp_path, report_to="tensorboard"), info={"model": "tiny-bert"})
    out = tmp_path / "run"
    events = EventAccumulator(str(out / tracking.PROJECT))  # the run's own writer; hparams sit in a subfolder
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/epoch", "eval/loss", "eval/accuracy"} <= tags, tags
    train_lines, eval_lines = records(out, "train"), records(out, "eval")
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    for tag, lines, key in (("train/loss", train_lines, "loss"), ("eval/accuracy", eval_lines, "accuracy")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [r["step"] for r in lines]
        assert [v for _, v in logged] == pytest.approx([r[key] for r in lines], rel=1e-6)  # float32 in the file
    settings = yaml.safe_load(next(out.rglob("hparams.yml")).read_text())
    assert settings["report_to"] == "tensorboard" and settings["max_steps"] == 6
    assert settings["prefix_num_virtual_tokens"] == 3 and settings["model"] == "tiny-bert"


def test_unknown_tracker_is_refused_by_the_allowed_names(tmp_path):
    with pytest.raises(PrefixTuneError, match="report_to must be one of none, tensorboard, trackio, mlflow, wandb"):
        config(tmp_path, report_to="comet")


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    model, tok = classifier()
    with pytest.raises(PrefixTuneError, match=r"'wandb' package: pip install 'prefixtune\[trackers\]'"):
        train(model, tok, ROWS, None, config(tmp_path, report_to="wandb"))


def test_none_writes_no_event_files(tmp_path):
    model, tok = classifier()
    train(model, tok, ROWS, ROWS[:8], config(tmp_path, max_steps=3))
    out = tmp_path / "run"
    assert records(out, "train") and not event_files(tmp_path)
    assert not (out / tracking.PROJECT).exists()


def test_an_interrupted_run_still_closes_the_tracker(tmp_path, monkeypatch):
    from accelerate.tracking import TensorBoardTracker

    closed = []
    finish = TensorBoardTracker.finish
    monkeypatch.setattr(TensorBoardTracker, "finish", lambda self: (closed.append(self.logging_dir), finish(self)))

    def ctrl_c(state):
        if state.step == 4:
            raise KeyboardInterrupt

    model, tok = classifier()
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, ROWS, None, config(tmp_path, report_to="tensorboard"), stop_hook=ctrl_c)
    assert closed == [str(tmp_path / "run" / tracking.PROJECT)]
    events = EventAccumulator(str(tmp_path / "run" / tracking.PROJECT))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]  # what was logged before the interruption
