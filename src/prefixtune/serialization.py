"""Prefix files on disk: safetensors for tensors, JSON for everything else, never pickle.

Writes go to a temporary file in the same folder, are fsynced and then renamed, so a crash or a
full disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from prefixtune.errors import PrefixTuneError

CONFIG_NAME = "prefixtune_config.json"
WEIGHTS_NAME = "prefixtune_model.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a PEFT adapter's files
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as handle:
        handle.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_prefix(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors first, config last: a folder with a config always has its matching tensors."""
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata={"format": "pt"}))
    write_json(directory / CONFIG_NAME, {"format_version": FORMAT_VERSION, **config})


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file that must hold one object; anything else, a missing file included, is a one-line PrefixTuneError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PrefixTuneError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrefixTuneError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PrefixTuneError(f"{path} must hold a JSON object")
    return data


def read_config(directory: str | os.PathLike) -> dict:
    """Read and parse the JSON config, refusing pickled checkpoints before anything is opened."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PrefixTuneError(f"prefix folder {str(directory)!r} does not exist")
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not (directory / CONFIG_NAME).exists():
        hint = ""
        if pickles:
            hint = (
                f"; it holds pickle files {pickles}, which prefixtune never loads because they can run code. "
                "If you trust them, convert once with torch.load(..., weights_only=True) and "
                "safetensors.torch.save_file"
            )
        elif (directory / PEFT_CONFIG).exists():
            hint = "; it looks like a PEFT adapter: convert it with `prefixtune convert`"
        raise PrefixTuneError(f"{str(directory)!r} has no {CONFIG_NAME}{hint}")
    config = read_json_object(directory / CONFIG_NAME)
    version = config.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise PrefixTuneError(f"{directory / CONFIG_NAME}: unsupported format_version {version!r} (expected 1)")
    return config


def read_safetensors(path: str | os.PathLike, what: str, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (or only `keys`, each required), or an error naming `what` it is.

    The one reader of tensors from disk: safetensors never runs code, and a truncated or foreign file
    becomes one clear error instead of a library's traceback.
    """
    path = Path(path)
    if not path.exists():
        raise PrefixTuneError(f"{what} {str(path)!r} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = list(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in found if keys is None or key in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PrefixTuneError(f"{what} {str(path)!r} is corrupt or not safetensors: {exc}") from exc
    missing = [k for k in keys or () if k not in tensors]
    if missing:
        raise PrefixTuneError(f"{what} {str(path)!r} holds no {missing} tensor (keys: {found})")
    return tensors


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    return read_safetensors(Path(directory) / WEIGHTS_NAME, "prefix file")
