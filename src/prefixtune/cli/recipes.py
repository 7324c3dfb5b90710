"""Recipe files: a YAML or JSON object holding the same options as the command-line flags.

A recipe keeps a run reproducible and reviewable; flags given on the command line win over it.
Keys may use dashes or underscores (`learning-rate` or `learning_rate`). An unknown key is an
error that names it, because a misspelt option silently ignored would train the wrong thing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prefixtune.data import decode_utf8
from prefixtune.errors import PrefixTuneError, first_line


def load_recipe(path: str | Path, known: Iterable[str]) -> dict[str, Any]:
    """Read a recipe and return `{option: value}` with underscore keys, refusing keys not in `known`."""
    path = Path(path)
    if not path.is_file():
        raise PrefixTuneError(f"recipe {str(path)!r}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PrefixTuneError(f"recipe {path}: cannot read it: {exc.strerror or exc}") from None
    text = decode_utf8(f"recipe {path}", raw)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrefixTuneError(f"recipe {path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # a number of more than 4300 digits, nesting too deep
            raise PrefixTuneError(f"recipe {path}: unreadable JSON: {first_line(exc)}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PrefixTuneError(f"recipe {path}: malformed YAML: {first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - PyYAML's value constructors raise plain errors
            # e.g. `2001-02-30` (no such day), `!!int abc`, a 5000-digit number, nesting too deep
            raise PrefixTuneError(f"recipe {path}: unreadable YAML value: {first_line(exc)}") from None
    else:
        raise PrefixTuneError(f"recipe {path}: unsupported file type {path.suffix!r}; expected .yaml, .yml or .json")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PrefixTuneError(f"recipe {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return normalise(data, known, str(path))


def normalise(data: Mapping[str, Any], known: Iterable[str], source: str = "recipe") -> dict[str, Any]:
    """Dash/underscore-insensitive keys, checked against `known`."""
    known = set(known)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            unknown.append(str(key))
        out[name] = value
    if unknown:
        raise PrefixTuneError(
            f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known keys: {', '.join(sorted(known))}"
        )
    return out


def merge(recipe: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """Recipe values overridden by every flag the user actually gave (flags left unset are None)."""
    merged = dict(recipe)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged
