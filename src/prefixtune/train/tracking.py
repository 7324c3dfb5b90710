"""Experiment trackers (TensorBoard, Trackio, MLflow, Weights & Biases) through Accelerate's own `log_with`.

Why Accelerate's trackers rather than writers of our own: one code path for every tracker Accelerate knows,
and it logs on the main process only, so a multi-process run reports each number once. metrics.jsonl stays
the record this library reads back (curves, the summary); a tracker gets a copy of every line written to it,
named `<split>/<metric>` (`train/loss`, `eval/accuracy`) at the line's optimizer step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from prefixtune.errors import PrefixTuneError
from prefixtune.train.run_log import MetricsLog

TRACKERS = ("none", "tensorboard", "trackio", "mlflow", "wandb")
INSTALL = "pip install 'prefixtune[trackers]'"
PROJECT = "prefixtune"  # the project (W&B, Trackio), experiment (MLflow) or subfolder (TensorBoard) of every run
RUN_NAME_KEYWORD = {"wandb": "name", "trackio": "name", "mlflow": "run_name"}  # TensorBoard has no run name


def check_tracker(report_to: str) -> None:
    """Refuse an unknown tracker by the allowed names (config validation; imports nothing)."""
    if report_to not in TRACKERS:
        raise PrefixTuneError(f"report_to must be one of {', '.join(TRACKERS)}; got {report_to!r}")


def accelerator_options(report_to: str, output_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments for `Accelerator(...)`: nothing for 'none', so an untracked run is set up as before.

    The tracker's package is looked for here, at the start of a run, so a missing one is one clear error
    naming the extra to install instead of Accelerate's warning and a run that tracks nothing.
    """
    check_tracker(report_to)
    if report_to == "none":
        return {}
    if importlib.util.find_spec(report_to) is None:
        raise PrefixTuneError(f"--report-to {report_to} needs the {report_to!r} package: {INSTALL}")
    return {"log_with": report_to, "project_dir": str(output_dir)}


def run_settings(cfg: Any, prefix_config: Any = None, info: dict | None = None) -> dict[str, Any]:
    """The run's settings as one flat dict of JSON scalars, the one shape every tracker's config view takes
    (TensorBoard's hparams refuse lists): the training record's fields, `prefix_<field>`, then the TrainConfig;
    a list or dict becomes its JSON text."""
    flat: dict[str, Any] = dict(info or {})
    if prefix_config is not None:
        flat |= {f"prefix_{k}": v for k, v in prefix_config.to_dict().items()}
    flat |= dataclasses.asdict(cfg)
    scalar = (bool, int, float, str, type(None))
    return {k: v if isinstance(v, scalar) else json.dumps(v, sort_keys=True) for k, v in flat.items()}


def tracked_values(record: dict) -> dict[str, float]:
    """A metrics.jsonl line as tracker scalars: every number but the step, named after the line's split."""
    split = record.get("split", "train")
    return {
        f"{split}/{k}": v
        for k, v in record.items()
        if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TrackedLog(MetricsLog):
    """metrics.jsonl whose every line also goes to the run's tracker (when `--report-to` names one)."""

    def __init__(self, path: Path, enabled: bool, accelerator: Any, report_to: str) -> None:
        super().__init__(path, enabled)
        self.accelerator, self.tracking = accelerator, report_to != "none"

    def start(self, cfg: Any, prefix_config: Any = None, info: dict | None = None) -> None:
        """Open the tracker's run (every process calls this; Accelerate starts it on the main one only)."""
        if not self.tracking:
            return
        keyword = RUN_NAME_KEYWORD.get(cfg.report_to)
        init_kwargs = {cfg.report_to: {keyword: Path(cfg.output_dir).name}} if keyword else {}
        settings = run_settings(cfg, prefix_config, info)
        self.accelerator.init_trackers(PROJECT, config=settings, init_kwargs=init_kwargs)

    def write(self, record: dict) -> None:
        super().write(record)
        values = tracked_values(record) if self.tracking else {}
        if values:
            self.accelerator.log(values, step=record.get("step"))

    def end(self) -> None:
        """Close the tracker's run once (files flushed, a W&B/MLflow run marked finished); later calls do nothing.

        This is `Accelerator.end_training` without its last step, destroying the process group: a run ends
        before the CLI scores the test split, and `tune` trains trial after trial in one process group.
        """
        if not self.tracking:
            return
        self.tracking = False
        for tracker in self.accelerator.trackers:
            tracker.finish()
