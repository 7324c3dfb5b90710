"""The Hugging Face Hub, the way PEFT users expect it: a prefix is fetched by its id and pushed with a model card.

Only a prefix's own files cross, in either direction: JSON, safetensors and the card (and a PEFT adapter's
safetensors on the way in). Pickle files are never downloaded, uploaded or accepted, and neither are the
checkpoints, logs and plots a training run leaves in its folder. The card itself is `model_card.py`.

Of prefixtune it imports only serialization and model_card (neither imports the model), so `model.py`
may import it at the top.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefixtune import serialization
from prefixtune.errors import PrefixTuneError
from prefixtune.model_card import CARD_NAME, TRAIN_INFO, model_card

PEFT_CONFIG, PEFT_WEIGHTS = serialization.PEFT_CONFIG, serialization.PEFT_WEIGHTS
# The CLI's training record (labels, template, base model) travels with the prefix: without it
# `prefixtune predict` cannot name the classes of a downloaded classifier.
PREFIX_FILES = (serialization.CONFIG_NAME, serialization.WEIGHTS_NAME, TRAIN_INFO)
DOWNLOADED = (*PREFIX_FILES, CARD_NAME, PEFT_CONFIG, PEFT_WEIGHTS)
UPLOADED = (*PREFIX_FILES, CARD_NAME)
# user/name as the hub spells it: letters, digits, '-', '_' and '.', no '--' or '..', 96 characters a part.
HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")

__all__ = [
    "DOWNLOADED",
    "UPLOADED",
    "check_repo_id",
    "is_hub_id",
    "model_card",
    "push_to_hub",
    "resolve",
    "split_revision",
]


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` reads as a hub id `user/name` rather than a local path (an existing path never does)."""
    return isinstance(source, str) and bool(HUB_ID.fullmatch(source)) and not Path(source).exists()


def check_repo_id(repo_id: str) -> None:
    """Refuse a repository id the hub would refuse, before a run spends its hours on being uploaded there."""
    if not (isinstance(repo_id, str) and HUB_ID.fullmatch(repo_id)):
        raise PrefixTuneError(f"{repo_id!r} is not a hub repository id: expected user/name")


def split_revision(spec: str) -> tuple[str, str | None]:
    """`user/name@v2` -> ("user/name", "v2"); hub ids never hold '@', so it can only mean a revision."""
    repo_id, at, revision = spec.partition("@")
    return (repo_id, revision or None) if at else (spec, None)


def _where(repo_id: str, revision: str | None) -> str:
    return f"Hugging Face Hub repository {repo_id!r} (revision {revision or 'main'!r})"


def _hub_failures() -> tuple[type[BaseException], ...]:
    """What a hub call raises when the network, a token or a repository fails: HfHubHTTPError is an OSError,
    offline mode a ConnectionError, a malformed id a ValueError; transport errors come from httpx2
    (huggingface_hub 2) or httpx (before)."""
    found: list[type[BaseException]] = [OSError, ValueError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(name).HTTPError)
    return tuple(found)


def resolve(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A prefix folder for `source`: a local folder as it is, or a hub id `user/name` downloaded (or found in
    the hub cache, offline) at `revision` (a branch, tag or commit; default main), prefix files only.

    The folder returned holds a prefixtune prefix or a PEFT adapter in safetensors; anything else, and every
    hub failure, is one PrefixTuneError naming the id, the revision and what was expected.
    """
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise PrefixTuneError(f"{str(source)!r} is a local folder: a revision ({revision!r}) is for hub ids only")
        return path
    if not is_hub_id(source):
        if path.exists():
            raise PrefixTuneError(f"prefix {str(source)!r} is not a folder")
        raise PrefixTuneError(f"prefix folder {str(source)!r} does not exist")  # nor is it a hub id user/name
    folder = _download(str(source), revision)
    _check_downloaded(folder, _where(str(source), revision))
    return folder


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _where(repo_id, revision)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(DOWNLOADED)))
    except RevisionNotFoundError:
        raise PrefixTuneError(f"the {where} does not exist: the repository has no such branch, tag or commit") from None
    except GatedRepoError:
        raise PrefixTuneError(f"the {where} is gated: accept its conditions on the hub, then log in") from None
    except RepositoryNotFoundError:
        raise PrefixTuneError(
            f"the {where} was not found (a private one needs a token: `hf auth login` or HF_TOKEN), nor a local "
            "folder of that name; expected a prefix pushed with prefixtune"
        ) from None
    except LocalEntryNotFoundError:
        raise PrefixTuneError(
            f"the {where} cannot be downloaded: the hub cannot be reached (offline, or HF_HUB_OFFLINE is set), "
            "that revision is not in the local hub cache, and no local folder has that name"
        ) from None
    except _hub_failures() as exc:
        raise PrefixTuneError(f"downloading the {where} failed: {' '.join(str(exc).split())}") from exc


def _check_downloaded(folder: Path, where: str) -> None:
    """A prefixtune prefix or a PEFT adapter in safetensors, or an error saying what the repository lacks."""
    present = {p.name for p in folder.iterdir()}
    if {serialization.CONFIG_NAME, serialization.WEIGHTS_NAME} <= present:
        return
    if PEFT_CONFIG in present:
        if PEFT_WEIGHTS in present:
            return
        raise PrefixTuneError(
            f"the {where} holds a PEFT adapter without {PEFT_WEIGHTS}: its weights are pickle (adapter_model.bin), "
            "which prefixtune never downloads or loads"
        )
    raise PrefixTuneError(
        f"the {where} holds no prefix: expected {serialization.CONFIG_NAME} with {serialization.WEIGHTS_NAME} "
        f"(a prefixtune prefix) or {PEFT_CONFIG} with {PEFT_WEIGHTS} (a PEFT adapter)"
    )


def _write_card(folder: Path, repo_id: str, info: dict | None) -> None:
    """README.md: ours, rewritten for this push; a card of the user's own (no prefixtune front matter) is kept."""
    card = folder / CARD_NAME
    if card.is_file() and "library_name: prefixtune" not in card.read_text(encoding="utf-8", errors="replace"):
        return
    serialization.write_bytes(card, model_card(folder, info, repo_id=repo_id).encode())


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload prefixtune prefix",
    info: dict | None = None,
) -> str:
    """Upload a saved prefix folder to the hub repository `repo_id` (created if missing, private if asked) and
    return the commit's URL. The model card is written into the folder first (atomically); only the prefix
    files and the card are sent. `revision` names a branch, created from main when missing; `info` adds to
    the training record the card reads from the folder (prefixtune_train.json, test_metrics.json, metrics.jsonl).
    """
    folder = Path(folder)
    serialization.read_config(folder)  # a prefix folder (not pickle) before anything is sent
    check_repo_id(repo_id)
    _write_card(folder, repo_id, info)
    from huggingface_hub import HfApi

    sent = [name for name in UPLOADED if (folder / name).is_file()]
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        for name in sent:
            shutil.copyfile(folder / name, Path(staging) / name)
        if (folder / TRAIN_INFO).is_file():
            record = _without_local_paths(serialization.read_json_object(folder / TRAIN_INFO))
            serialization.write_json(Path(staging) / TRAIN_INFO, record)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit: Any = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision,
                                            commit_message=commit_message, allow_patterns=sent)  # fmt: skip
        except _hub_failures() as exc:
            raise PrefixTuneError(f"uploading {folder} to the {_where(repo_id, revision)} failed: {exc}") from exc
    return str(commit.commit_url)


def _without_local_paths(record: dict) -> dict:
    """The training record as the hub may see it: no output folder, and a local base-model folder by name only."""
    record = dict(record)
    if isinstance(record.get("train_config"), dict):
        record["train_config"] = {k: v for k, v in record["train_config"].items() if k != "output_dir"}
    model = record.get("model")
    if isinstance(model, str) and (os.path.isabs(model) or Path(model).exists()):
        record["model"] = Path(model).name
    return record
