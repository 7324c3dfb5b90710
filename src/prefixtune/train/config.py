"""How to train: every setting with its help text, what a run returns, and the optimizer and schedule
they build. The CLI's `train` options are generated from `TrainConfig`'s fields."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prefixtune.config import documented
from prefixtune.errors import PrefixTuneError
from prefixtune.train.tracking import TRACKERS, check_tracker

HEAD_INITS = ("random", "probe")
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adafactor")
SCHEDULERS = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """How to train. Every field's help text is also the CLI's `--help` for the matching flag."""

    output_dir: str = documented(
        "Folder for the prefix, checkpoints, metrics.jsonl and curves.png.", "prefixtune-output"
    )
    epochs: int | None = documented(
        "Passes over the training data. Unset: a step budget, max(1000 steps, 5 epochs), cut short by early "
        "stopping on validation (1000 steps: where the classification benchmark's prefixes peaked).",
        None,
    )
    max_steps: int | None = documented("Train for this many optimizer steps (overrides epochs).", None)
    time_limit: float | None = documented(
        "Stop training after this many seconds, then evaluate and save as usual (the schedule is not shortened).",
        None,
    )
    batch_size: int = documented("Examples per forward pass (per process).", 16)
    eval_batch_size: int = documented("Examples per forward pass when evaluating.", 64)
    learning_rate: float | None = documented(
        "Peak learning rate. Unset: measured per method (prefixtune.train.defaults): 3e-2 for a direct prefix, 1e-3 "
        "through the MLP, 1e-2 for prompt tuning (1e-1 on a decoder). Prefixes want far larger rates than "
        "fine-tuning.",
        None,
    )
    optimizer: str = documented(
        "adamw | adam | sgd (momentum 0.9) | rmsprop | adafactor (fixed learning rate, no relative step).", "adamw"
    )
    scheduler: str = documented("Learning-rate schedule after warmup: linear | cosine | constant.", "linear")
    warmup_ratio: float = documented("Fraction of the steps spent warming the learning rate up from 0.", 0.06)
    weight_decay: float = documented("Decoupled weight decay (adamw, adafactor) or L2 (others).", 0.0)
    max_grad_norm: float | None = documented("Clip the gradient norm to this value; None turns clipping off.", 1.0)
    group_by_length: bool = documented(
        "Batch texts of similar length together (less padding, faster on CPU); the order stays seeded.", False
    )
    grad_accum: int = documented("Micro-batches summed before each optimizer step (effective batch = this x batch).", 1)
    bf16: bool = documented("Run forward passes under bfloat16 autocast (the prefix itself stays float32).", False)
    gradient_checkpointing: bool = documented(
        "Recompute activations in the backward pass: less memory, ~30% slower.", False
    )
    cache_frozen_layers: bool = documented(
        "With a prefix in the upper --layers only: compute the layers below it once per row and reuse them "
        "(no dropout there); later epochs and evaluations skip them. Costs the rows' hidden states in memory.",
        False,
    )
    head_init: str = documented(
        "Where a classifier's head starts. random: as the model made it. probe: first trained alone on cached "
        "vectors of the frozen model with the initial prefix (seconds), then on with the prefix: LP-FT "
        "(Kumar et al. 2022). On 800 three-class Rotten Tomatoes rows (BENCHMARKS.md, 'Defaults, search and "
        "baselines') it lifted the prefix's lead over a trained head alone.",
        "random",
    )
    seed: int = documented(
        "Seed for data order, dropout and prefix initialisation: the same seed gives the same run.", 42
    )
    max_length: int = documented(
        "Longest input in tokens, prefix included; never more than the model's positions.", 128
    )
    max_target_length: int | None = documented(
        "Longest target in tokens (seq2seq); None: same as the input budget.", 64
    )
    template: str = documented("Prompt built from each row; {text} is replaced by the row's text.", "{text}")
    eval_every: int | None = documented(
        "Evaluate on validation every N optimizer steps; 0: at the end of every epoch. Unset: 10 times per run.",
        None,
    )
    eval_generate: bool = documented(
        "Also generate and score ROUGE/BLEU at each evaluation (slow); else loss only.", False
    )
    max_new_tokens: int = documented("Tokens to generate when scoring generation.", 32)
    patience: int | None = documented(
        "Early stopping: stop after this many evaluations without improvement; 0 never stops. "
        "Unset: 3 when there is validation data.",
        None,
    )
    metric: str = documented(
        "Metric that picks the best prefix: auto (accuracy, or loss for generation) or any name.", "auto"
    )
    checkpoint_every: int = documented("Write a resumable checkpoint every N steps; 0: at every evaluation.", 0)
    resume: bool = documented("Continue from the latest checkpoint in output_dir, exactly where it stopped.", False)
    log_every: int = documented("Write the training loss to metrics.jsonl every N steps.", 10)
    skip_bad_batches: bool = documented(
        "When a step's loss or gradients are NaN/inf, skip it (no optimizer or schedule update) and count it, "
        "instead of stopping training with an error. The skipped step still counts towards epochs and max_steps.",
        False,
    )
    progress: bool = documented("Show a progress bar with loss, speed and ETA.", True)
    report_to: str = documented(
        f"Experiment tracker that also gets every metrics.jsonl line (as train/loss, eval/accuracy, ...), through "
        f"Accelerate: {' | '.join(TRACKERS)}. TensorBoard writes under output_dir; the others need their own "
        "setup (login, server). Install them with pip install 'prefixtune[trackers]'.",
        "none",
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.head_init not in HEAD_INITS:
            raise PrefixTuneError(f"head_init must be one of {', '.join(HEAD_INITS)}; got {self.head_init!r}")
        if self.optimizer not in OPTIMIZERS:
            raise PrefixTuneError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise PrefixTuneError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {self.scheduler!r}")
        positive = ("epochs", "max_steps", "batch_size", "eval_batch_size", "grad_accum", "max_length", "log_every")
        for name in positive:
            value = getattr(self, name)
            if value is None and name in ("epochs", "max_steps"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PrefixTuneError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "patience", "checkpoint_every"):
            value = getattr(self, name)
            if value is None and name != "checkpoint_every":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PrefixTuneError(f"{name} must be an integer >= 0, got {value!r}")
        if self.learning_rate is not None and not (
            isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
        ):
            raise PrefixTuneError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise PrefixTuneError(f"time_limit must be a positive number of seconds, got {self.time_limit!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise PrefixTuneError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        check_tracker(self.report_to)
        if "{text}" not in self.template:
            raise PrefixTuneError(f"template {self.template!r} must contain {{text}}")

    @classmethod
    def fields_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)


@dataclass
class TrainResult:
    """What `train` returns: where things went and how it ended."""

    output_dir: str
    steps: int
    epochs_completed: float
    seconds: float
    best_metric: str
    best_value: float | None
    best_step: int | None
    stopped_early: bool
    out_of_time: bool = False
    skipped_steps: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    trainable: dict[str, float] = field(default_factory=dict)
    config: TrainConfig | None = None  # the settings that ran, every default filled in


# ---------------------------------------------------------------------------------- building blocks
def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The five `--optimizer` choices (adamw, adam, sgd, rmsprop, adafactor), all driven by an external
    learning-rate schedule: Adafactor's own relative step size and warmup are off."""
    lr, wd = cfg.learning_rate, cfg.weight_decay
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=wd)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    warmup = int(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def metric_name(cfg: TrainConfig, task: str) -> str:
    if cfg.metric != "auto":
        return cfg.metric
    return "accuracy" if task == "classification" else "loss"


def better(name: str, value: float, best: float | None) -> bool:
    """Loss-like metrics improve downwards, everything else upwards."""
    if best is None:
        return True
    return value < best if name in ("loss", "perplexity") else value > best


# ------------------------------------------------------------------------------------------- loop
