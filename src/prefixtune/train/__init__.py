"""Training a prefix: settings (`config`), data-sized defaults (`defaults`), the loop (`loop`), exact
resumption (`checkpoints`) and what a run writes as it goes (`run_log`).

`train(model, tokenizer, train_rows, eval_rows, TrainConfig(...))` is the entry point.
"""

from prefixtune.train.config import (
    OPTIMIZERS,
    SCHEDULERS,
    TrainConfig,
    TrainResult,
    better,
    build_optimizer,
    build_scheduler,
    metric_name,
)
from prefixtune.train.loop import EpochSampler, Trainer, evaluate_rows, result_rows, train

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "EpochSampler",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "better",
    "build_optimizer",
    "build_scheduler",
    "evaluate_rows",
    "metric_name",
    "result_rows",
    "train",
]
