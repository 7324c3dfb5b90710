"""What the playground shows about one served prefix, read from its folder: its card and its training curves.

Why a module of its own: these are plain file reads, with one rule that matters more than the rest: they stay
inside the prefix's own folder. A name reaches the file system only if it is a prefix name (`NAME_RE`: no dots,
no slashes), only fixed file names are read, and a file that is a link leading out of the folder is refused,
so a request can never name, or be led to, any other file. `model_card` already gathers a folder's facts for
the hub's README; this module picks from them what a person comparing prefixes wants on screen.
"""

from __future__ import annotations

from pathlib import Path

from prefixtune import model_card, serialization
from prefixtune.errors import PrefixTuneError
from prefixtune.serving.limits import NAME_RE, RequestError

# train.run_log.CURVES, spelled here so that serving does not import the training loop at start (tests check they agree)
CURVES = "curves.png"
# Every file `card` and `curves` may read; nothing else in a prefix folder is ever opened for a request.
READ = (
    serialization.CONFIG_NAME,
    serialization.WEIGHTS_NAME,
    model_card.TRAIN_INFO,
    model_card.TEST_METRICS,
    model_card.METRICS_LOG,
    CURVES,
)


def unknown(name: str) -> RequestError:
    return RequestError(404, f"unknown prefix {name!r}: see /v1/models for the served ones", code="model_not_found")


def folder_of(root: Path, name: str, served: list[str]) -> Path:
    """The folder of the served prefix `name`; 404 for any other name, before the file system is touched."""
    if not NAME_RE.fullmatch(name) or name not in served:
        raise unknown(name)
    return root / name


def _confined(folder: Path, file: str) -> Path | None:
    """`folder/file` if it exists as a regular file whose real location is in the folder itself, None if
    it does not exist; 403 if it is a link (or in a linked folder) that leads anywhere else."""
    path = folder / file
    if not path.exists():
        return None
    if not path.is_file() or path.resolve().parent != folder.resolve():
        raise RequestError(403, f"{file} of prefix {folder.name!r} leads outside its folder", "permission_error")
    return path


def card(folder: Path) -> dict:
    """The prefix's facts for the page: method, length, base model, trainable parameters, test and best
    validation metrics, and whether it has training curves. Only numbers are passed on from the metrics."""
    for file in READ:
        _confined(folder, file)
    try:
        facts = model_card.facts_of_folder(folder)
    except PrefixTuneError as exc:
        message = f"prefix {folder.name!r} cannot be read: {exc}".replace(str(folder), folder.name)
        raise RequestError(400, message) from None
    method = facts.prefix.get("method")
    return {
        "id": folder.name,
        "task": facts.task,
        "method": method,
        "num_virtual_tokens": facts.prefix.get("num_virtual_tokens"),
        "reparam": None if facts.prefix.get("reparam") in (None, "none") else facts.prefix["reparam"],
        "base_model": model_card.base_model_name(facts) or None,  # a hub id or a folder's name, never a local path
        "architecture": facts.base.get("architecture"),
        "trainable_parameters": 0 if method == "text" else facts.parameters,  # a fixed text trains nothing
        "dataset": facts.info.get("dataset"),
        "test_metrics": _numbers(facts.test),
        "validation": _numbers(facts.validation),
        "curves": (folder / CURVES).is_file(),
    }


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def curves(folder: Path) -> bytes:
    """The prefix's curves.png (what `prefixtune train` drew); 404 if its run left none."""
    path = _confined(folder, CURVES)
    if path is None:
        raise RequestError(404, f"prefix {folder.name!r} has no training curves ({CURVES})", code="not_found")
    return path.read_bytes()
