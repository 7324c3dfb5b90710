"""Training defaults sized to the data, and where each number comes from.

A prefix is far more sensitive to its learning rate and to the number of steps than full
fine-tuning is: three epochs of an 800-row CSV are about 150 optimizer steps, and the prefix is still
learning when they end. So an unset budget is counted in optimizer steps (at least
`MIN_STEPS`), and validation decides when to stop: `EVALUATIONS` evaluations per run, stopping after
`PATIENCE` of them without improvement, and the best prefix is the one kept.

Every value here was chosen from a measurement of this project (BENCHMARKS.md, "Classification
quality", "Generation quality", "Defaults" and "The small set's reparameterisation"); the README's
"Defaults" section repeats the table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MIN_STEPS = 1000  # the classification benchmark's best prefix epochs were 600-1000 steps at batch 16-32
EPOCHS = 5  # large data sets: on the Rotten Tomatoes grid every 5-epoch point at lr <= 3e-2 beat its 2-epoch twin
EVALUATIONS = 10  # evaluations on validation per run, when --eval-every is not given
PATIENCE = 3  # evaluations without improvement before stopping, when validation data exists
# Below this many training rows a classifier's prefix trains through Li & Liang's MLP (`reparameterisation`): it
# led at 200 and 800 rows and trailed at 4,000; BBC topic's 1,792 stay direct, within half a point of its grid.
SMALL_CLASSIFICATION_ROWS = 1000

# (method, reparam, task) -> peak learning rate; None matches any value. First match wins.
LEARNING_RATES: list[tuple[tuple[str | None, str | None, str | None], float, str]] = [
    (("prefix", "mlp", None), 1e-3, "MLP reparameterisation: best of 1e-3/3e-3 in both quality benchmarks"),
    (("prefix", None, None), 3e-2, "direct prefix: best of 1e-2/3e-2 (classification) and 3e-2/1e-1 (generation)"),
    (("prompt", None, "causal_lm"), 1e-1, "prompt tuning on a decoder: best of 3e-2/1e-1 (generation benchmark)"),
    (("prompt", None, None), 1e-2, "prompt tuning: best of 1e-2/3e-2 (classification benchmark)"),
    ((None, None, None), 1e-2, "a head alone (method text): best of 3e-3/1e-2 (classification benchmark)"),
]


def learning_rate(method: str, reparam: str, task: str) -> float:
    """The measured default peak learning rate for a prefix of this kind on this task."""
    for (m, r, t), rate, _ in LEARNING_RATES:
        if m in (None, method) and r in (None, reparam) and t in (None, task):
            return rate
    raise AssertionError("the last LEARNING_RATES entry matches everything")


def reparameterisation(method: str, task: str, train_rows: int) -> str:
    """The measured default `reparam`: through the MLP for a prefix on a small classification set, else direct.

    Why: on a few hundred labelled rows a directly learned prefix overfits within a few epochs (its
    validation loss rises from the second evaluation on) and lands barely above a frozen head. Through Li &
    Liang's MLP it led on every small classification set measured: 200 rows (the classification benchmark's
    low-data table) and fresh samples of the 800-row small set, chosen on validation (BENCHMARKS.md, "The
    small set's reparameterisation"). Direct led on 4,000 rows (the capacity sweep) and on generation from
    640 BBC articles, so those stay direct.
    """
    small = method == "prefix" and task == "classification" and train_rows < SMALL_CLASSIFICATION_ROWS
    return "mlp" if small else "none"


def budget(steps_per_epoch: int, epochs: int | None, max_steps: int | None) -> int:
    """Optimizer steps to train for: `max_steps`, else `epochs` epochs, else max(MIN_STEPS, EPOCHS epochs)."""
    if max_steps:
        return max_steps
    if epochs:
        return epochs * steps_per_epoch
    return max(MIN_STEPS, EPOCHS * steps_per_epoch)


def resolve(cfg: Any, model: Any, steps_per_epoch: int, has_validation: bool) -> Any:
    """`cfg` with every unset (None) default filled in for this model and data; the result is what runs."""
    prefix = getattr(model, "prefix_config", None)
    method = getattr(prefix, "method", "text")
    reparam = getattr(prefix, "reparam", "none")
    task = getattr(model, "task", "classification")
    total = budget(steps_per_epoch, cfg.epochs, cfg.max_steps)
    filled = {
        "learning_rate": cfg.learning_rate if cfg.learning_rate is not None else learning_rate(method, reparam, task),
        "max_steps": total,
        "eval_every": cfg.eval_every if cfg.eval_every is not None else max(1, math.ceil(total / EVALUATIONS)),
        "patience": cfg.patience if cfg.patience is not None else (PATIENCE if has_validation else 0),
    }
    return dataclasses.replace(cfg, **filled)
