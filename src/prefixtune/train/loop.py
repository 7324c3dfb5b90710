"""The training loop: cross-entropy on a frozen model's prefix, run through Accelerate.

One code path serves one CPU and many GPUs: `Accelerator.prepare` wraps the model, optimizer,
data and schedule; only the main process evaluates, logs and writes files. Everything written is
atomic (temporary file, fsync, rename) and nothing is pickled. Checkpoints that resume exactly live
in `checkpoints.py`; the metrics log, curves and summary table in `run_log.py`.
"""


from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from prefixtune import baselines, serialization, tasks
from prefixtune.core import layer_cache
from prefixtune.data import collate
from prefixtune.errors import PrefixTuneError
from prefixtune.train import defaults, tracking
from prefixtune.train.checkpoints import CHECKPOINTS, LATEST, TrainState, load_checkpoint, save_checkpoint
from prefixtune.train.config import TrainConfig, TrainResult, better, build_optimizer, build_scheduler, metric_name
from prefixtune.train.run_log import CURVES, METRICS_LOG, plot_curves, summary_table


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


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


def _non_finite_gradients(named: Sequence[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Names of the trainable parameters whose gradient holds a NaN or an infinity."""
    return [name for name, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


def _all_finite(model: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_tensors().values())


def evaluate_rows(
    model: Any, tokenizer: Any, rows: Sequence[dict], cfg: TrainConfig, with_generation: bool | None = None
) -> dict[str, float]:
    """`tasks.evaluate` with a run's own settings: validation during training, and test after it.

    Generation metrics follow `cfg.eval_generate` unless `with_generation` says otherwise.
    """
    return tasks.evaluate(
        model,
        tokenizer,
        rows,
        max_length=cfg.max_length,
        batch_size=cfg.eval_batch_size,
        template=cfg.template,
        max_target_length=cfg.max_target_length,
        max_new_tokens=cfg.max_new_tokens,
        with_generation=cfg.eval_generate if with_generation is None else with_generation,
        bf16=cfg.bf16,
    )


class Trainer:
    """One training run in four phases: `__init__` sets up, `fit` trains, `validate` scores, `finish` saves.

    Why a class: the phases share the prepared model, optimizer, schedule, state and log, and a run
    ends for exactly one `stop` reason (early, interrupted, out of time), which `fit` checks once.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        train_rows: Sequence[dict],
        eval_rows: Sequence[dict] | None,
        config: TrainConfig,
        info: dict | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        config.validate()
        self.tokenizer, self.eval_rows, self.info = tokenizer, eval_rows, info
        self.out = Path(config.output_dir)
        # bf16 is our own autocast rather than Accelerate's mixed_precision, which is fixed once per process.
        # With no GPU, `cpu=True` is what lets Accelerate join a multi-process launch as gloo CPU ranks.
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.grad_accum,
            cpu=not _has_accelerator(),
            **tracking.accelerator_options(config.report_to, self.out),
        )
        self.main = self.accelerator.is_main_process
        set_seed(config.seed)
        if config.head_init == "probe" and not config.resume:  # every process probes alike: the same head
            if getattr(model, "task", None) != "classification":
                raise PrefixTuneError(f"head_init 'probe' trains a classifier's head; this model's task is "
                                      f"{getattr(model, 'task', None)!r}: use head_init 'random'")  # fmt: skip
            baselines.probe_head(model, tokenizer, train_rows, max_length=config.max_length,
                                 template=config.template, seed=config.seed)  # fmt: skip
        examples = tasks.encode(
            model, tokenizer, train_rows, config.max_length, config.template, config.max_target_length
        )
        lengths = [len(e["input_ids"]) for e in examples] if config.group_by_length else None
        self.sampler = EpochSampler(len(examples), config.seed, lengths, config.batch_size)
        loader = torch.utils.data.DataLoader(
            examples,
            batch_size=config.batch_size,
            sampler=self.sampler,
            collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id, "right"),
            generator=torch.Generator().manual_seed(config.seed),  # never draw from the global RNG
        )
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        if not self.params:
            raise PrefixTuneError("the model has no trainable parameters (method 'text' trains nothing)")
        shards = self.accelerator.num_processes
        self.loader = self.accelerator.prepare(loader)  # first: the budget counts this process's share of the data
        steps_per_epoch = math.ceil(len(self.loader) / config.grad_accum)
        self.cfg = cfg = defaults.resolve(config, model, steps_per_epoch, bool(eval_rows))
        model.train()
        self.model, self.optimizer = self.accelerator.prepare(model, build_optimizer(self.params, cfg))
        self.total = cfg.max_steps
        # Accelerate steps a prepared scheduler once per process for every optimizer step.
        self.scheduler = self.accelerator.prepare(build_scheduler(self.optimizer, cfg, self.total * shards))
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.metric = metric_name(cfg, self.unwrapped.task)
        self.state = TrainState()
        if cfg.resume:
            self.state = load_checkpoint(self.out, self.accelerator, self.model, self.optimizer, self.scheduler, cfg)
        self.log = tracking.TrackedLog(self.out / METRICS_LOG, self.main, self.accelerator, cfg.report_to)
        if self.main:
            self._start_files()
        self.log.start(cfg, self.unwrapped.prefix_config, self.info)
        self.last_eval: dict[str, float] = {}
        self.evaluated_at = -1
        self.micro_losses: list[float] = []
        self.stop: str | None = None  # why training ended before its budget: early | interrupted | time

    def _start_files(self) -> None:
        if not self.cfg.resume and (self.out / CHECKPOINTS).exists():
            # A later --resume must never pick up a checkpoint of an earlier, different run.
            print(
                f"note: {self.out} held checkpoints of an earlier run; starting over (--resume continues one)",
                file=sys.stderr,
            )
            shutil.rmtree(self.out / CHECKPOINTS)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log.restart(self.state.step if self.cfg.resume else None)
        record = {
            "model": None,
            **(self.info or {}),
            "task": self.unwrapped.task,
            "template": self.cfg.template,
            "max_length": self.cfg.max_length,
            "max_target_length": self.cfg.max_target_length,
            "train_config": dataclasses.asdict(self.cfg),
        }
        serialization.write_json(self.out / tasks.TRAIN_INFO, record)

    # ------------------------------------------------------------------------------------ phases
    def fit(
        self,
        stop_hook: Callable[[TrainState], bool] | None = None,
        eval_hook: Callable[[int, dict[str, float]], bool] | None = None,
    ) -> None:
        """Optimizer steps until the budget is spent or a stop reason appears."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        self.bar = tqdm(
            total=self.total,
            initial=state.step,
            disable=not (self.main and cfg.progress),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        self.started, self.base_seconds = time.perf_counter(), state.seconds
        self.window: list[float] = []
        while state.step < self.total and self.stop is None:
            self.sampler.epoch = state.epoch
            skip = state.batch_in_epoch
            data = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            for batch in data:
                if not self._micro_step(batch):
                    continue
                evaluated = cfg.eval_every > 0 and state.step % cfg.eval_every == 0
                if evaluated and self.validate(eval_hook):
                    self.stop = "early"
                if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or (
                    evaluated and not cfg.checkpoint_every
                ):
                    self._checkpoint()
                if stop_hook is not None and stop_hook(state):
                    self.stop = "interrupted"
                if self.stop is None and cfg.time_limit and time.perf_counter() - self.started > cfg.time_limit:
                    self.stop = "time"
                if self.stop is not None or state.step >= self.total:
                    break
            if state.batch_in_epoch >= len(self.loader) and self.stop != "interrupted":  # the epoch is complete
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if cfg.eval_every == 0 and self.stop is None:
                    if self.validate(eval_hook):
                        self.stop = "early"
                    if not cfg.checkpoint_every:
                        self._checkpoint()
        self.bar.close()
        state.seconds = self.base_seconds + time.perf_counter() - self.started
        if self.stop != "interrupted" and self.eval_rows and self.evaluated_at != state.step and self.stop != "early":
            if self.validate(eval_hook):  # the final steps were never evaluated
                self.stop = "early"

    def _micro_step(self, batch: dict) -> bool:
        """Forward and backward one micro-batch; at a gradient-sync boundary also step, log, and say True."""
        state, acc = self.state, self.accelerator
        problem = None
        with acc.accumulate(self.model):
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                loss = self.model(**batch).loss
            self.micro_losses.append(float(loss.detach()))
            acc.backward(loss)
            if acc.sync_gradients:
                problem = self._bad_numbers()
                if problem is None and self.cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            if problem is None:
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad()
        state.batch_in_epoch += 1
        if not acc.sync_gradients:
            return False
        if problem is not None:
            self._skip_or_stop(problem)
        state.step += 1
        if problem is None:
            self.window.append(sum(self.micro_losses) / len(self.micro_losses))
            self.bar.set_postfix(loss=f"{self.window[-1]:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        self.micro_losses.clear()
        self.bar.update(1)
        if self.window and (state.step % self.cfg.log_every == 0 or state.step == self.total):
            self.log.write(
                {
                    "split": "train",
                    "step": state.step,
                    "epoch": self._epoch(),
                    "loss": sum(self.window) / len(self.window),
                    "lr": self.scheduler.get_last_lr()[0],
                    **({"skipped_steps": state.skipped_steps} if state.skipped_steps else {}),
                }
            )
            self.window.clear()
        return True

    def validate(self, eval_hook: Callable[[int, dict[str, float]], bool] | None = None) -> bool:
        """Score validation on the main process and keep the best prefix; True means stop now (all processes)."""
        state, cfg = self.state, self.cfg
        stop, self.evaluated_at = False, state.step
        if self.main and self.eval_rows:
            self.last_eval = evaluate_rows(self.unwrapped, self.tokenizer, self.eval_rows, cfg)
            if self.metric not in self.last_eval:
                raise PrefixTuneError(f"metric {self.metric!r} is not computed; available: {', '.join(self.last_eval)}")
            self.log.write({"split": "eval", "step": state.step, "epoch": self._epoch(), **self.last_eval})
            if better(self.metric, self.last_eval[self.metric], state.best):
                state.best, state.best_step, state.bad_evals = self.last_eval[self.metric], state.step, 0
                self.unwrapped.save_pretrained(self.out)
            else:
                state.bad_evals += 1
                stop = cfg.patience > 0 and state.bad_evals >= cfg.patience
            if eval_hook is not None and eval_hook(state.step, dict(self.last_eval)):
                stop = True
            plot_curves(self.log.records(), self.out / CURVES)
            self.bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            stop = broadcast_object_list([stop])[0]
        return stop

    def finish(self) -> TrainResult:
        """Put the best prefix back in the model, save it with the curves, and print the summary."""
        if self.stop != "interrupted":
            if self.main:
                if self.eval_rows and self.state.best_step is not None:
                    best = serialization.read_tensors(self.out)  # the best prefix, written at its evaluation
                    self.unwrapped.load_tensors(best, source=str(self.out))
                else:
                    self.unwrapped.save_pretrained(self.out)
                records = self.log.records()
                if records:
                    plot_curves(records, self.out / CURVES)
            self.accelerator.wait_for_everyone()
        result = TrainResult(
            output_dir=self.cfg.output_dir,
            steps=self.state.step,
            epochs_completed=self._epoch(),
            seconds=self.state.seconds,
            best_metric=self.metric,
            best_value=self.state.best,
            best_step=self.state.best_step,
            stopped_early=self.stop == "early",
            out_of_time=self.stop == "time",
            skipped_steps=self.state.skipped_steps,
            last_eval=dict(self.last_eval),
            trainable=self.unwrapped.trainable_parameters(),
            config=self.cfg,
        )
        if self.main and self.stop != "interrupted":
            print(summary_table(result_rows(result)))
        return result

    # ----------------------------------------------------------------------------------- helpers
    def _epoch(self) -> float:
        return round(self.state.epoch + self.state.batch_in_epoch / max(len(self.loader), 1), 4)

    def _checkpoint(self) -> None:
        self.state.seconds = self.base_seconds + time.perf_counter() - self.started
        save_checkpoint(self.out, self.accelerator, self.model, self.optimizer, self.scheduler, self.state, self.cfg)

    def _bad_numbers(self) -> str | None:
        """Why this step's loss or gradients are unusable (NaN/inf), agreed by every process; None if fine."""
        bad_loss = [v for v in self.micro_losses if not math.isfinite(v)]
        problem = None
        if bad_loss:
            problem = f"the loss is {bad_loss[0]}"
        elif broken := _non_finite_gradients(self.named):
            problem = f"the gradients of {', '.join(broken)} hold NaN or inf values (the loss was finite)"
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([0.0 if problem is None else 1.0], device=self.accelerator.device)
            if float(self.accelerator.reduce(flag, reduction="sum").item()) > 0 and problem is None:
                problem = "another process saw a NaN/inf loss or gradient"
        return problem

    def _skip_or_stop(self, problem: str) -> None:
        """A step with bad numbers: skipped and counted, or the end of training (the prefix was not updated)."""
        state, at = self.state, self.state.step + 1
        if self.cfg.skip_bad_batches:
            state.skipped_steps += 1
            self.log.write({"split": "skipped", "step": at, "reason": problem, "skipped_steps": state.skipped_steps})
            if self.main:
                self.bar.write(f"step {at}: skipped, {problem} ({state.skipped_steps} skipped so far)")
            return
        kept = "the best prefix so far stays"
        if self.main and not (self.eval_rows and state.best_step is not None) and _all_finite(self.unwrapped):
            self.unwrapped.save_pretrained(self.out)  # the last good prefix: this step never reached the optimizer
            kept = "the last good prefix (before this step) is saved"
        self.log.write({"split": "stopped", "step": at, "reason": problem})
        self.bar.close()
        latest = self._latest_checkpoint()
        resume = f"; --resume continues from the checkpoint of step {latest}" if latest is not None else ""
        raise PrefixTuneError(
            f"training stopped at step {at} (epoch {state.epoch + 1}): {problem}; {kept} in {self.out}{resume}. "
            "Lower --learning-rate, check the data, or pass --skip-bad-batches to skip such steps"
        )

    def _latest_checkpoint(self) -> int | None:
        try:
            return int(json.loads((self.out / CHECKPOINTS / LATEST).read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def train(
    model: Any,
    tokenizer: Any,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict] | None = None,
    config: TrainConfig | None = None,
    info: dict | None = None,
    stop_hook: Callable[[TrainState], bool] | None = None,
    eval_hook: Callable[[int, dict[str, float]], bool] | None = None,
) -> TrainResult:
    """Train `model` (a PrefixModel) on rows `{"text", "label"|"target"}`; write everything to `output_dir`.

    `info` is stored as prefixtune_train.json next to the prefix (base model name, label names),
    so `evaluate`/`predict` can rebuild the model later. `stop_hook(state)` is called after every
    optimizer step; returning True stops the run right there as if it had been killed (tests).
    `eval_hook(step, metrics)` is called on the main process after every evaluation; returning True
    ends training there as early stopping does (the best prefix is kept): a search prunes trials with it.
    """
    config = config or TrainConfig()
    cache = layer_cache.cached_lower_layers(model) if config.cache_frozen_layers else contextlib.nullcontext()
    with cache:
        trainer = Trainer(model, tokenizer, train_rows, eval_rows, config, info)
        try:
            trainer.fit(stop_hook, eval_hook)
            return trainer.finish()
        finally:
            trainer.log.end()  # however the run ends (a bad step, Ctrl-C): the tracker's run is closed once


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
