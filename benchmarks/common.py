"""Shared pieces of the benchmarks: one subprocess per row (clean peak memory), and the baselines.

Every row runs in its own Python process so its peak RSS is its own, and so a crash in one row
costs that row only. Rows print one JSON object on their last stdout line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixtune import serialization
from prefixtune.core import attention, hooks

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_row(module: str, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run `python -m module args` and return the JSON it printed last, plus the wall time."""
    start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return {**json.loads(lines[-1]), "wall_s": wall}


def run_missing(path: Path, results: dict, key: str, module: str, runs: list[dict], describe: Callable[[dict], str],
                full: Callable[[dict], dict] = dict, args: list[str] | None = None) -> None:  # fmt: skip
    """Run each of `runs` that `results[key]` lacks (`module --row RUN`, one process each) and save `results` to
    `path` after each: a long benchmark resumes where it stopped. A saved row counts as RUN when it holds all of
    `full(RUN)`, the run's settings with its defaults filled in; `describe` gives the line printed for a new row."""
    done = results.setdefault(key, [])
    for run in runs:
        if any(full(run).items() <= row.items() for row in done):
            continue
        done.append(run_row(module, ["--row", json.dumps(run), *(args or [])]))
        print(f"  {run}: {describe(done[-1])}", flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def pick_on_validation(module: str, grid: list[list[str]], key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run `module` once per argument list; the run with the highest validation score `key` wins.

    Every benchmark row chooses its settings this way, so the test split never chooses anything.
    """
    tried = []
    for args in grid:
        r = run_row(module, args)
        tried.append(r)
        print(f"  {' '.join(args)}: {key} {r[key]:.4f} ({r['wall_s']:.0f} s)", flush=True)
    return max(tried, key=lambda r: r[key]), tried


def paired_ratio_interval(
    numerators: list[float], denominators: list[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(numerators) / mean(denominators), resampling examples in pairs.

    Two systems scored on the same articles share each article's difficulty; resampling the pairs
    keeps that, so the interval reflects only how the two differ, not how hard the sample was.
    """
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need paired scores, got {len(numerators)} and {len(denominators)}")
    a, b = torch.tensor(numerators, dtype=torch.float64), torch.tensor(denominators, dtype=torch.float64)
    draws = torch.randint(len(a), (resamples, len(a)), generator=torch.Generator().manual_seed(seed))
    ratios = a[draws].mean(1) / b[draws].mean(1).clamp_min(1e-12)
    tail = (1 - level) / 2
    return float(ratios.quantile(tail)), float(ratios.quantile(1 - tail))


def emit(result: dict[str, Any]) -> None:
    """The row's result, as the last stdout line, with the row process's own peak memory."""
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}), flush=True)


def machine() -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


class Finetune(nn.Module):
    """A baseline in the trainer's shape: the whole model ('all') or only its task head ('head') trains.

    It offers what `prefixtune.train.train` asks of a model (task, positions_used, save/load of the
    trained tensors), so the baselines run through exactly the same loop as the prefixes. With
    pooling 'mean' its head reads the same mean-pooled vector as a prefix's, through the same hook.
    """

    def __init__(
        self, base_model: nn.Module, task: str, trainable: str, head: str = "classifier", pooling: str = "model"
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.task = task
        self.positions_used = 0
        self.pooling = pooling
        for name, p in base_model.named_parameters():
            p.requires_grad_(trainable == "all" or name.startswith(head + "."))
        if pooling == "mean":
            hooks.install(base_model, [], base_model.base_model)

    def forward(self, **kwargs: Any) -> Any:
        if self.pooling == "model":
            return self.base_model(**kwargs)
        with attention.activate(attention.PrefixState(slots={}, mean_pool=[None])):
            return self.base_model(**kwargs)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.base_model.generate(**kwargs)

    @property
    def config(self) -> Any:
        return self.base_model.config

    def gradient_checkpointing_enable(self) -> None:
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def state_tensors(self, keep_reparam: bool = True) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.base_model.named_parameters() if p.requires_grad}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "") -> None:
        params = dict(self.base_model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def save_pretrained(self, directory: str | Path, keep_reparam: bool = True) -> None:
        """The trained tensors, in the prefix file's format, so the loop can restore the best epoch."""
        serialization.save_prefix(directory, {"baseline": "finetune"}, self.state_tensors())

    def trainable_parameters(self) -> dict[str, float]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
