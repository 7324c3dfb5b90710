"""From resolved options to what a training verb runs: the task, the prefix and the model.

`train` and `tune` both start here, so a trial of a search is built exactly as a plain run is.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from prefixtune.config import PrefixConfig
from prefixtune.errors import PrefixTuneError
from prefixtune.train import TrainConfig, defaults


def prefix_config(opts: dict, seed: int, task: str, train_rows: int) -> PrefixConfig:
    """The PrefixConfig fields among resolved options (`--prefix-text` is its `text`); an unset `--reparam`
    is sized to the data (`defaults.reparameterisation`)."""
    fields = {f.name for f in dataclasses.fields(PrefixConfig)}
    values = {k: opts[k] for k in fields if k in opts and opts[k] is not None}
    if opts.get("prefix_text"):
        values["text"] = opts["prefix_text"]
    if "reparam" not in values:
        values["reparam"] = defaults.reparameterisation(values.get("method", PrefixConfig.method), task, train_rows)
        if values["reparam"] == "mlp":
            print(f"note: {train_rows} training rows, fewer than {defaults.SMALL_CLASSIFICATION_ROWS:,}: the prefix "
                  "trains through the MLP, which overfits less on few rows (--reparam none learns it directly)",
                  file=sys.stderr)  # fmt: skip
    values["seed"] = seed
    values.pop("task", None)
    return PrefixConfig(**values)


def data_task(opts: dict, train_rows: list[dict]) -> str:
    """--task as the data settles it: 'auto' with labels is classification; the model decides the rest."""
    has_labels = "label" in train_rows[0]
    task = opts["task"]
    if task == "auto":
        task = "classification" if has_labels else "auto"
    if task == "classification" and not has_labels:
        raise PrefixTuneError("classification needs labels: set --label-column (or drop --target-column)")
    return task


def build_model(opts: dict, train_rows: list[dict], label_names: list[str] | None) -> tuple[Any, Any, TrainConfig]:
    """The base model with a fresh prefix attached, and the training settings, from resolved options."""
    import torch

    from prefixtune import tasks
    from prefixtune.model import attach

    task = data_task(opts, train_rows)
    train_cfg = TrainConfig(**{f.name: opts[f.name] for f in dataclasses.fields(TrainConfig)})
    prefix_cfg = prefix_config(opts, train_cfg.seed, task, len(train_rows))
    num_labels = len(label_names) if label_names else None
    torch.manual_seed(train_cfg.seed)  # a new task head is drawn at load time: the seed must cover it
    base, tokenizer, task = tasks.load_model(opts["model"], task, num_labels, label_names)
    return attach(base, prefix_cfg, tokenizer=tokenizer), tokenizer, train_cfg
