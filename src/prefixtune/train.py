"""The training loop: cross-entropy on a frozen model's prefix, run through Accelerate.

One code path serves one CPU and many GPUs: `Accelerator.prepare` wraps the model, optimizer,
data and schedule; only the main process evaluates, logs and writes files. Everything written is
atomic (temporary file, fsync, rename) and nothing is pickled. Checkpoints that resume exactly live
in `checkpoints.py`; the metrics log, curves and summary table in `run_log.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixtune import serialization, tasks
from prefixtune.checkpoints import CHECKPOINTS, LATEST, TrainState, load_checkpoint, save_checkpoint
from prefixtune.data import collate
from prefixtune.errors import PrefixTuneError
from prefixtune.run_log import CURVES, METRICS_LOG, MetricsLog, plot_curves, summary_table

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adafactor")
SCHEDULERS = ("linear", "cosine", "constant")


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def _opt(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """How to train. Every field's help text is also the CLI's `--help` for the matching flag."""

    output_dir: str = _opt("Folder for the prefix, checkpoints, metrics.jsonl and curves.png.", "prefixtune-output")
    epochs: int = _opt("Passes over the training data.", 3)
    max_steps: int | None = _opt("Stop after this many optimizer steps (overrides epochs).", None)
    time_limit: float | None = _opt(
        "Stop training after this many seconds, then evaluate and save as usual (the schedule is not shortened).",
        None,
    )
    batch_size: int = _opt("Examples per forward pass (per process).", 16)
    eval_batch_size: int = _opt("Examples per forward pass when evaluating.", 64)
    learning_rate: float = _opt(
        "Peak learning rate. Prefixes want far larger rates than fine-tuning: 5e-3..3e-2 (P-tuning v2).", 1e-2
    )
    optimizer: str = _opt(
        "adamw | adam | sgd (momentum 0.9) | rmsprop | adafactor (fixed learning rate, no relative step).", "adamw"
    )
    scheduler: str = _opt("Learning-rate schedule after warmup: linear | cosine | constant.", "linear")
    warmup_ratio: float = _opt("Fraction of the steps spent warming the learning rate up from 0.", 0.06)
    weight_decay: float = _opt("Decoupled weight decay (adamw, adafactor) or L2 (others).", 0.0)
    max_grad_norm: float | None = _opt("Clip the gradient norm to this value; None turns clipping off.", 1.0)
    group_by_length: bool = _opt(
        "Batch texts of similar length together (less padding, faster on CPU); the order stays seeded.", False
    )
    grad_accum: int = _opt("Micro-batches summed before each optimizer step (effective batch = this x batch).", 1)
    bf16: bool = _opt("Run forward passes under bfloat16 autocast (the prefix itself stays float32).", False)
    gradient_checkpointing: bool = _opt("Recompute activations in the backward pass: less memory, ~30% slower.", False)
    seed: int = _opt("Seed for data order, dropout and prefix initialisation: the same seed gives the same run.", 42)
    max_length: int = _opt("Longest input in tokens, prefix included; never more than the model's positions.", 128)
    max_target_length: int | None = _opt("Longest target in tokens (seq2seq); None: same as the input budget.", 64)
    template: str = _opt("Prompt built from each row; {text} is replaced by the row's text.", "{text}")
    eval_every: int = _opt("Evaluate every N optimizer steps; 0 evaluates at the end of every epoch.", 0)
    eval_generate: bool = _opt("Also generate and score ROUGE/BLEU at each evaluation (slow); else loss only.", False)
    max_new_tokens: int = _opt("Tokens to generate when scoring generation.", 32)
    patience: int = _opt("Early stopping: stop after this many evaluations without improvement; 0 never stops.", 0)
    metric: str = _opt(
        "Metric that picks the best prefix: auto (accuracy, or loss for generation) or any name.", "auto"
    )
    checkpoint_every: int = _opt("Write a resumable checkpoint every N steps; 0: at every evaluation.", 0)
    resume: bool = _opt("Continue from the latest checkpoint in output_dir, exactly where it stopped.", False)
    log_every: int = _opt("Write the training loss to metrics.jsonl every N steps.", 10)
    skip_bad_batches: bool = _opt(
        "When a step's loss or gradients are NaN/inf, skip it (no optimizer or schedule update) and count it, "
        "instead of stopping training with an error. The skipped step still counts towards epochs and max_steps.",
        False,
    )
    progress: bool = _opt("Show a progress bar with loss, speed and ETA.", True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PrefixTuneError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise PrefixTuneError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {self.scheduler!r}")
        positive = ("epochs", "batch_size", "eval_batch_size", "grad_accum", "max_length", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PrefixTuneError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "patience", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise PrefixTuneError(f"{name} must be an integer >= 0, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise PrefixTuneError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise PrefixTuneError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise PrefixTuneError(f"time_limit must be a positive number of seconds, got {self.time_limit!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise PrefixTuneError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
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


class EpochSampler(torch.utils.data.Sampler):
    """A permutation fixed by (seed, epoch), so the data order of any epoch can be rebuilt on resume.

    With `lengths` and `batch_size` it groups examples of similar length into the same batch
    (shuffled windows of 50 batches, sorted inside, batches shuffled again), which on CPU cuts
    the compute spent on padding roughly in half for short texts.
    It deliberately has no `set_epoch`: Accelerate would reset it to its own iteration counter,
    which starts from zero again after a resume.
    """

    def __init__(self, size: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.batch_size = lengths, batch_size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen).tolist()
        if self.lengths is None:
            return iter(order)
        window = self.batch_size * 50
        batches = []
        for start in range(0, self.size, window):
            chunk = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
        shuffled += [b for b in batches if len(b) < self.batch_size]  # the one short batch stays last
        return iter([i for batch in shuffled for i in batch])


# ---------------------------------------------------------------------------------- building blocks
def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The five optimizers the issue names, all driven by an external learning-rate schedule."""
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
def _non_finite_gradients(named: Sequence[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Names of the trainable parameters whose gradient holds a NaN or an infinity."""
    return [name for name, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


def _all_finite(model: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_tensors().values())


def _evaluate(model: Any, tokenizer: Any, rows: Sequence[dict], cfg: TrainConfig) -> dict[str, float]:
    return tasks.evaluate(
        model,
        tokenizer,
        rows,
        max_length=cfg.max_length,
        batch_size=cfg.eval_batch_size,
        template=cfg.template,
        max_target_length=cfg.max_target_length,
        max_new_tokens=cfg.max_new_tokens,
        with_generation=cfg.eval_generate,
        bf16=cfg.bf16,
    )


def train(
    model: Any,
    tokenizer: Any,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict] | None = None,
    config: TrainConfig | None = None,
    info: dict | None = None,
    stop_hook: Callable[[TrainState], bool] | None = None,
) -> TrainResult:
    """Train `model` (a PrefixModel) on rows `{"text", "label"|"target"}`; write everything to `output_dir`.

    `info` is stored as prefixtune_train.json next to the prefix (base model name, label names),
    so `evaluate`/`predict` can rebuild the model later. `stop_hook(state)` is called after every
    optimizer step; returning True stops the run right there as if it had been killed (tests).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    cfg.validate()
    out = Path(cfg.output_dir)
    # bf16 is our own autocast rather than Accelerate's mixed_precision, which is fixed once per process.
    # With no GPU, `cpu=True` is what lets Accelerate join a multi-process launch as gloo CPU ranks.
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not _has_accelerator())
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    if not cfg.resume and (out / CHECKPOINTS).exists() and main:
        # A later --resume must never pick up a checkpoint of an earlier, different run.
        print(
            f"note: {out} held checkpoints of an earlier run; starting over (--resume continues one)", file=sys.stderr
        )
        shutil.rmtree(out / CHECKPOINTS)

    examples = tasks.encode(model, tokenizer, train_rows, cfg.max_length, cfg.template, cfg.max_target_length)
    lengths = [len(e["input_ids"]) for e in examples] if cfg.group_by_length else None
    sampler = EpochSampler(len(examples), cfg.seed, lengths, cfg.batch_size)
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id, "right"),
        generator=torch.Generator().manual_seed(cfg.seed),  # never draw from the global RNG
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise PrefixTuneError("the model has no trainable parameters (method 'text' trains nothing)")
    optimizer = build_optimizer(params, cfg)
    model.train()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)  # this process's share of the data
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    # Accelerate steps a prepared scheduler once per process for every optimizer step.
    scheduler = accelerator.prepare(build_scheduler(optimizer, cfg, total * accelerator.num_processes))
    unwrapped = accelerator.unwrap_model(model)

    state = TrainState()
    if cfg.resume:
        state = load_checkpoint(out, accelerator, model, optimizer, scheduler, cfg)
    log = MetricsLog(out / METRICS_LOG, main)
    if main:
        if not cfg.resume and (out / CHECKPOINTS).exists():
            # A later --resume must never pick up a checkpoint of an earlier, different run.
            print(
                f"note: removing the checkpoints of an earlier run in {out} (--resume continues one)", file=sys.stderr
            )
            shutil.rmtree(out / CHECKPOINTS)
        out.mkdir(parents=True, exist_ok=True)
        log.restart(state.step if cfg.resume else None)
        record = {
            "model": None,
            **(info or {}),
            "task": unwrapped.task,
            "template": cfg.template,
            "max_length": cfg.max_length,
            "max_target_length": cfg.max_target_length,
            "train_config": dataclasses.asdict(cfg),
        }
        serialization.write_json(out / tasks.TRAIN_INFO, record)
    metric = metric_name(cfg, unwrapped.task)
    bar = tqdm(
        total=total,
        initial=state.step,
        disable=not (main and cfg.progress),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    started, base_seconds = time.perf_counter(), state.seconds
    last_eval: dict[str, float] = {}
    stopped_early = interrupted = False
    evaluated_at = -1
    window: list[float] = []
    micro_losses: list[float] = []

    def run_eval() -> bool:
        """Evaluate on the main process; keep the best prefix; say whether to stop early (all processes)."""
        nonlocal last_eval, evaluated_at
        stop, evaluated_at = False, state.step
        if main and eval_rows:
            last_eval = _evaluate(unwrapped, tokenizer, eval_rows, cfg)
            if metric not in last_eval:
                raise PrefixTuneError(f"metric {metric!r} is not computed; available: {', '.join(last_eval)}")
            log.write({"split": "eval", "step": state.step, "epoch": round(state.epoch + frac(), 4), **last_eval})
            if better(metric, last_eval[metric], state.best):
                state.best, state.best_step, state.bad_evals = last_eval[metric], state.step, 0
                unwrapped.save_pretrained(out)
            else:
                state.bad_evals += 1
                stop = cfg.patience > 0 and state.bad_evals >= cfg.patience
            plot_curves(log.records(), out / CURVES)
            bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            stop = broadcast_object_list([stop])[0]
        return stop

    def frac() -> float:
        return state.batch_in_epoch / max(len(loader), 1)

    def checkpoint() -> None:
        state.seconds = base_seconds + time.perf_counter() - started
        save_checkpoint(out, accelerator, model, optimizer, scheduler, state, cfg)

    def bad_numbers() -> str | None:
        """Why this step's loss or gradients are unusable (NaN/inf), agreed by every process; None if fine."""
        bad_loss = [v for v in micro_losses if not math.isfinite(v)]
        problem = None
        if bad_loss:
            problem = f"the loss is {bad_loss[0]}"
        elif broken := _non_finite_gradients(named):
            problem = f"the gradients of {', '.join(broken)} hold NaN or inf values (the loss was finite)"
        if accelerator.num_processes > 1:
            flag = torch.tensor([0.0 if problem is None else 1.0], device=accelerator.device)
            if float(accelerator.reduce(flag, reduction="sum").item()) > 0 and problem is None:
                problem = "another process saw a NaN/inf loss or gradient"
        return problem

    def skip_or_stop(problem: str) -> None:
        """A step with bad numbers: skipped and counted, or the end of training (the prefix was not updated)."""
        at = state.step + 1
        if cfg.skip_bad_batches:
            state.skipped_steps += 1
            log.write({"split": "skipped", "step": at, "reason": problem, "skipped_steps": state.skipped_steps})
            if main:
                bar.write(f"step {at}: skipped, {problem} ({state.skipped_steps} skipped so far)")
            return
        kept = "the best prefix so far stays"
        if main and not (eval_rows and state.best_step is not None) and _all_finite(unwrapped):
            unwrapped.save_pretrained(out)  # the last good prefix: this step never reached the optimizer
            kept = "the last good prefix (before this step) is saved"
        log.write({"split": "stopped", "step": at, "reason": problem})
        bar.close()
        latest = root_latest()
        resume = f"; --resume continues from the checkpoint of step {latest}" if latest is not None else ""
        raise PrefixTuneError(
            f"training stopped at step {at} (epoch {state.epoch + 1}): {problem}; {kept} in {out}{resume}. "
            "Lower --learning-rate, check the data, or pass --skip-bad-batches to skip such steps"
        )

    def root_latest() -> int | None:
        try:
            return int(json.loads((out / CHECKPOINTS / LATEST).read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    out_of_time = False
    while state.step < total and not (stopped_early or interrupted or out_of_time):
        sampler.epoch = state.epoch
        data = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in data:
            problem = None
            with accelerator.accumulate(model):
                with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = model(**batch).loss
                micro_losses.append(float(loss.detach()))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    problem = bad_numbers()
                    if problem is None and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                if problem is None:
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            if problem is not None:
                skip_or_stop(problem)
            state.step += 1
            if problem is None:
                window.append(sum(micro_losses) / len(micro_losses))
                bar.set_postfix(loss=f"{window[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            micro_losses.clear()
            bar.update(1)
            if window and (state.step % cfg.log_every == 0 or state.step == total):
                mean = sum(window) / len(window)
                log.write(
                    {
                        "split": "train",
                        "step": state.step,
                        "epoch": round(state.epoch + frac(), 4),
                        "loss": mean,
                        "lr": scheduler.get_last_lr()[0],
                        **({"skipped_steps": state.skipped_steps} if state.skipped_steps else {}),
                    }
                )
                window.clear()
            evaluated = cfg.eval_every > 0 and state.step % cfg.eval_every == 0
            if evaluated:
                stopped_early = run_eval()
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or (
                evaluated and not cfg.checkpoint_every
            ):
                checkpoint()
            if stop_hook is not None and stop_hook(state):
                interrupted = True
            if cfg.time_limit and time.perf_counter() - started > cfg.time_limit:
                out_of_time = True
            if stopped_early or interrupted or out_of_time or state.step >= total:
                break
        if state.batch_in_epoch >= len(loader) and not interrupted:  # the epoch is complete
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if cfg.eval_every == 0 and not stopped_early:
                stopped_early = run_eval()
                if not cfg.checkpoint_every:
                    checkpoint()
    bar.close()
    state.seconds = base_seconds + time.perf_counter() - started
    if interrupted:
        return _result(cfg, state, metric, stopped_early, last_eval, unwrapped, frac())
    if eval_rows and evaluated_at != state.step and not stopped_early:
        stopped_early = run_eval()  # the final steps were never evaluated
    if main:
        if eval_rows and state.best_step is not None:
            best = serialization.read_tensors(out)  # the best prefix, written at its evaluation
            unwrapped.load_tensors(best, source=str(out))
        else:
            unwrapped.save_pretrained(out)
        records = log.records()
        if records:
            plot_curves(records, out / CURVES)
    accelerator.wait_for_everyone()
    result = _result(cfg, state, metric, stopped_early, last_eval, unwrapped, frac())
    result.out_of_time = out_of_time
    if main:
        print(summary_table(result_rows(result)))
    return result


def _result(
    cfg: TrainConfig, state: TrainState, metric: str, stopped: bool, last: dict, model: Any, frac: float
) -> TrainResult:
    return TrainResult(
        output_dir=cfg.output_dir,
        steps=state.step,
        epochs_completed=round(state.epoch + frac, 4),
        seconds=state.seconds,
        best_metric=metric,
        best_value=state.best,
        best_step=state.best_step,
        stopped_early=stopped,
        skipped_steps=state.skipped_steps,
        last_eval=dict(last),
        trainable=model.trainable_parameters(),
    )


def result_rows(result: TrainResult) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("steps", result.steps),
        ("epochs", result.epochs_completed),
        ("time (s)", round(result.seconds, 1)),
        ("trainable params", f"{int(result.trainable['trainable']):,} ({result.trainable['percent']:.3f}%)"),
    ]
    if result.best_value is not None:
        rows.append((f"best {result.best_metric}", result.best_value))
        rows.append(("best step", result.best_step))
    rows += [(f"last eval {k}", v) for k, v in result.last_eval.items()]
    if result.stopped_early:
        rows.append(("stopped early", "yes"))
    if result.out_of_time:
        rows.append(("stopped at time limit", "yes"))
    if result.skipped_steps:
        rows.append(("skipped bad steps", result.skipped_steps))
    rows.append(("saved to", result.output_dir))
    return rows
