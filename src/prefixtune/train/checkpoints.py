"""Resumable training checkpoints: safetensors + JSON, committed by one atomic rename.

A checkpoint holds everything that makes a resumed run equal an uninterrupted one: the prefix (with
its MLP, if any), the optimizer and scheduler state, every RNG of every process, and where training
stands (`TrainState`). Nothing is pickled: optimizer tensors go to safetensors and the rest to JSON.
A checkpoint only counts once `latest.json` names it, and that file is written last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from prefixtune import serialization
from prefixtune.errors import PrefixTuneError

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
# Settings that must match for a checkpoint to resume exactly.
RESUME_KEYS = ("batch_size", "grad_accum", "seed", "optimizer", "scheduler", "learning_rate", "epochs", "max_steps")
# Test hook, for the kill test in tests/test_reliability.py only: when this environment variable holds a step
# number, the checkpoint of that step prints a marker line to stderr and sleeps after `latest.json`'s temporary
# file is written but before it is renamed into place, so a test can SIGKILL the run in the middle of the save.
TEST_PAUSE_ENV = "PREFIXTUNE_TEST_PAUSE_IN_CHECKPOINT"


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint as JSON."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    seconds: float = 0.0
    skipped_steps: int = 0  # steps skipped for NaN/inf loss or gradients (skip_bad_batches)


# ------------------------------------------------------------------------------- optimizer state I/O
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors for safetensors, everything else for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG that training touches, as uint8/uint32 tensors plus JSON."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python": [version, list(internal), gauss], "numpy": [np_kind, int(np_pos), int(np_has_gauss), np_gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    directory: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, state: TrainState, cfg: Any
) -> None:
    """Write one resumable checkpoint; it counts only once `latest.json` points at it (written last)."""
    root = directory / CHECKPOINTS
    path = root / f"step-{state.step:07d}"
    rank = accelerator.process_index
    tensors, meta = _rng_state()
    serialization.write_bytes(path / f"rng-{rank}.safetensors", safetensors_bytes(tensors))
    serialization.write_json(path / f"rng-{rank}.json", meta)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path / "prefix", keep_reparam=True)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        serialization.write_bytes(path / "optimizer.safetensors", safetensors_bytes(opt_tensors))
        serialization.write_json(path / "optimizer.json", opt_meta)
        serialization.write_json(path / "scheduler.json", scheduler.state_dict())
        serialization.write_json(
            path / "state.json",
            {
                "state": dataclasses.asdict(state),
                "config": dataclasses.asdict(cfg),
                "processes": accelerator.num_processes,
            },
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with serialization.atomic_path(root / LATEST) as handle:  # the commit point of the checkpoint
            handle.write((json.dumps({"checkpoint": path.name, "step": state.step}, indent=2) + "\n").encode())
            _test_pause(state.step, handle)
        for old in root.glob("step-*"):
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)
        for stale in [*root.glob(".*.tmp"), *path.glob(".*.tmp")]:  # left by a save killed before its rename
            stale.unlink(missing_ok=True)


def _test_pause(step: int, handle: Any) -> None:
    """Test hook (see TEST_PAUSE_ENV): hold the save of checkpoint `step` open, so a test can kill the run there."""
    wanted = os.environ.get(TEST_PAUSE_ENV)
    if wanted and wanted.strip() == str(step):
        handle.flush()  # the temporary file now holds the new content; only the rename is missing
        print(f"{TEST_PAUSE_ENV}: paused in checkpoint step {step}", file=sys.stderr, flush=True)
        time.sleep(600)


def load_checkpoint(
    directory: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, cfg: Any
) -> TrainState:
    """Restore everything `save_checkpoint` wrote, refusing a checkpoint made with other settings."""
    root = directory / CHECKPOINTS
    if not (root / LATEST).is_file():
        raise PrefixTuneError(f"--resume: no checkpoint in {root} (expected {root / LATEST})")
    path = root / serialization.read_json_object(root / LATEST)["checkpoint"]
    saved = serialization.read_json_object(path / "state.json")
    changed = [k for k in RESUME_KEYS if saved["config"].get(k) != getattr(cfg, k)]
    if changed:
        diff = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise PrefixTuneError(f"--resume: settings differ from the checkpoint in {path} ({diff}); use the same ones")
    if saved.get("processes", 1) != accelerator.num_processes:
        raise PrefixTuneError(
            f"--resume: the checkpoint was written by {saved.get('processes')} processes, "
            f"this run has {accelerator.num_processes}"
        )
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_tensors(serialization.read_tensors(path / "prefix"), source=str(path / "prefix"))
    flat = serialization.read_safetensors(path / "optimizer.safetensors", "checkpoint file")
    optimizer.load_state_dict(_unflatten_optimizer(flat, serialization.read_json_object(path / "optimizer.json")))
    scheduler.load_state_dict(serialization.read_json_object(path / "scheduler.json"))
    rank = accelerator.process_index
    rng = serialization.read_safetensors(path / f"rng-{rank}.safetensors", "checkpoint file")
    _set_rng_state(rng, serialization.read_json_object(path / f"rng-{rank}.json"))
    return TrainState(**saved["state"])
