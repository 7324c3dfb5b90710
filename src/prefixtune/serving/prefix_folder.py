"""The prefixes folder as the source of truth: one subfolder per prefix, named like it.

Prefixes appear and disappear without a restart: the folder is polled (`sync`), and the admin
endpoints write to it (`install`, `delete`). An upload is written to a hidden staging folder, loaded
(validated) there, and only then renamed into place, so a half-written or invalid prefix is never
visible, neither to requests nor to the poller. Every method runs on the batcher's worker thread,
so loading never races a batch and the `PrefixCollection` only changes between batches.

Prefixes from the Hugging Face Hub (`--prefixes sentiment=user/repo`, or a bare `user/repo`) are fetched
once at start (`hub.resolve`: prefix files only, never pickle) and copied into the folder under their
name, so from then on they are ordinary subfolders: polled, loaded on demand, listed, deletable.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from prefixtune import hub, serialization
from prefixtune.collection import PrefixCollection
from prefixtune.errors import PrefixTuneError
from prefixtune.model import PrefixModel
from prefixtune.serving.limits import NAME_RE, RequestError

log = logging.getLogger("prefixtune.server")


def _signature(folder: Path) -> tuple | None:
    """What changes when a prefix folder is rewritten (atomic renames give new inodes)."""
    stats = []
    for name in (serialization.CONFIG_NAME, serialization.WEIGHTS_NAME):
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            if name == serialization.CONFIG_NAME:
                return None  # config is written last: without it the prefix is not complete yet
            stats.append(None)
            continue
        stats.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stats)


def _hub_name(repo_id: str) -> str:
    """The prefix name of a bare hub id: its repository's name, with what a name may not hold as '-'."""
    name = "".join(c if c.isalnum() or c in "_-" else "-" for c in repo_id.split("/")[-1])
    return name[:128]


def parse_sources(spec: str | Path) -> tuple[Path | None, dict[str, str]]:
    """`--prefixes` read as (the folder to watch, {name: hub id or prefix folder to place in it}).

    A Path or an existing folder is the watched folder, as it always was. Otherwise the value is a
    comma-separated list of NAME=SOURCE (a hub id `user/repo`, `user/repo@revision`, or one prefix folder),
    bare hub ids (named after the repository), and at most one folder to watch (created if missing; none
    given: a temporary one). A bare `a/b` is a folder when `a` exists here, else a hub id.
    """
    if isinstance(spec, Path) or Path(spec).is_dir():
        return Path(spec), {}
    root: Path | None = None
    placed: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in str(spec).split(","))):
        name, named, source = entry.partition("=")
        if not named:
            repo_id = hub.split_revision(entry)[0]
            if not hub.is_hub_id(repo_id) or Path(repo_id.split("/")[0]).exists():
                if root is not None:
                    raise PrefixTuneError(f"--prefixes names two folders to watch ({root} and {entry}); give one")
                root = Path(entry)
                continue
            name, source = _hub_name(repo_id), entry
        if not NAME_RE.fullmatch(name):
            raise PrefixTuneError(f"--prefixes: {name!r} is not a valid prefix name (letters, digits, '_' and '-')")
        if name in placed:
            raise PrefixTuneError(f"--prefixes names the prefix {name!r} twice ({placed[name]} and {source})")
        placed[name] = source
    return root, placed


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class PrefixFolder:
    """The prefixes directory as the source of truth. All methods run on the batcher's worker thread,
    so loading never races a batch and the collection only changes between batches."""

    def __init__(self, root: str | Path, bank: PrefixCollection, reserved: str, max_loaded: int = 0):
        watched, placed = parse_sources(root)
        if watched is None:  # only hub prefixes: they still need a folder, which lives as long as the server
            watched = Path(tempfile.mkdtemp(prefix="prefixtune-prefixes-"))
            atexit.register(shutil.rmtree, watched, True)
        self.root = watched
        self.max_loaded = max_loaded  # 0: load every folder in `sync`; n: load on demand, keep the n last used
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.root.mkdir(parents=True, exist_ok=True)
        self.bank = bank
        self.reserved = reserved
        self.seen: dict[str, tuple] = {}
        self.errors: dict[str, str] = {}
        for leftover in self.root.glob(".upload-*"):  # from a crash during an upload or delete
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(".trash-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for name, source in placed.items():
            self.place(name, source)

    def _scan(self) -> dict[str, tuple]:
        found = {}
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if not NAME_RE.fullmatch(entry.name) or entry.name == self.reserved:
                self.errors[entry.name] = "not a valid prefix name (letters, digits, '_' and '-'; not the base id)"
                continue
            sig = _signature(Path(entry.path))
            if sig is not None:
                found[entry.name] = sig
        return found

    def _trash(self, name: str) -> Path:
        """A hidden, unique path next to the prefixes, for a folder on its way out."""
        return self.root / f".trash-{name}-{uuid.uuid4().hex}"

    def sync(self) -> None:
        """Load new or changed subfolders and drop removed ones. A broken folder is reported in
        `errors` and not retried until it changes; a loaded version keeps serving meanwhile."""
        present = self._scan()
        self.errors = {n: e for n, e in self.errors.items() if (self.root / n).exists()}
        for name in [n for n in self.seen if n not in present]:
            del self.seen[name]
            self.recent.pop(name, None)
            self.errors.pop(name, None)
            if name in self.bank:
                self.bank.remove(name)
                log.info("prefix %r removed (its folder is gone)", name)
        for name, sig in present.items():
            if self.seen.get(name) == sig:
                continue
            self.seen[name] = sig
            if self.max_loaded and name not in self.bank:
                continue  # registered: loaded when a request names it
            try:
                self._load(name)
            except Exception:  # noqa: BLE001 - one bad folder must not stop the others
                pass

    def _load(self, name: str) -> None:
        try:
            self.bank.add(name, PrefixModel.from_pretrained(self.bank.base_model, self.root / name))
        except Exception as exc:
            self.errors[name] = str(exc)
            log.warning("prefix %r not loaded: %s", name, exc)
            raise
        self.errors.pop(name, None)
        log.info("prefix %r loaded", name)
        self.used(name)

    def names(self) -> list[str]:
        """Every prefix that can be served: loaded, or registered in the folder to load on demand."""
        return sorted(set(self.bank.names()) | ({n for n in self.seen if n not in self.errors} if self.max_loaded
                                                 else set()))  # fmt: skip

    def load(self, name: str) -> None:
        """Make a registered prefix ready (on demand, with a bound), dropping the least recently used beyond it."""
        if name not in self.bank:
            if name not in self.seen:
                raise RequestError(404, f"unknown prefix {name!r}", code="model_not_found")
            self._load(name)
        self.used(name)

    def used(self, name: str) -> None:
        """Note a use; with a bound, drop the least recently used prefixes beyond it (they reload on demand)."""
        self.recent[name] = None
        self.recent.move_to_end(name)
        while self.max_loaded and len(self.recent) > self.max_loaded:
            old, _ = self.recent.popitem(last=False)
            if old in self.bank and old != name:
                self.bank.remove(old)
                log.info("prefix %r unloaded (least recently used of %d)", old, self.max_loaded)

    def place(self, name: str, source: str) -> None:
        """Copy the prefix at `source` (a hub id, `id@revision`, or a local prefix folder) into the folder as
        `name`, replacing a different one there (the command line said so); the poller then loads it."""
        if name == self.reserved:
            raise PrefixTuneError(f"--prefixes: {name!r} is the base model's id; name the prefix otherwise")
        found = Path(source) if Path(source).is_dir() else hub.resolve(*hub.split_revision(source))
        target = self.root / name
        staging = Path(tempfile.mkdtemp(prefix=f".upload-{name}-", dir=self.root))
        try:
            for file in hub.DOWNLOADED:
                if (found / file).is_file():
                    shutil.copyfile(found / file, staging / file)  # the hub cache's links become files
            if target.is_dir() and _same_files(staging, target):
                return  # a restart with the same command: the folder keeps its files and its signature
            self._swap_in(staging, target, self._trash(name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("prefix %r placed from %s", name, source)

    def _swap_in(self, staging: Path, target: Path, trash: Path) -> None:
        """Rename a complete staging folder over `target`; the old version comes back if the rename fails."""
        try:
            if target.exists():
                os.replace(target, trash)
            try:
                os.replace(staging, target)
            except OSError:
                if trash.exists():  # put the previous version back
                    os.replace(trash, target)
                raise
            _fsync_dir(self.root)
        finally:
            shutil.rmtree(trash, ignore_errors=True)

    def install(self, name: str, record: dict, weights: bytes, replace: bool) -> None:
        """Write an uploaded prefix to a hidden folder, load it, then rename it into place."""
        target = self.root / name
        if not replace and (name in self.bank or target.exists()):
            raise RequestError(409, f"prefix {name!r} already exists; pass ?replace=true to overwrite it")
        record = {"format_version": serialization.FORMAT_VERSION, **record}
        staging = Path(tempfile.mkdtemp(prefix=f".upload-{name}-", dir=self.root))
        try:
            serialization.write_bytes(staging / serialization.WEIGHTS_NAME, weights)
            serialization.write_json(staging / serialization.CONFIG_NAME, record)
            try:
                model = PrefixModel.from_pretrained(self.bank.base_model, staging)
            except PrefixTuneError as exc:
                raise RequestError(400, f"invalid prefix: {str(exc).replace(str(staging), name)}") from exc
            self._swap_in(staging, target, self._trash(name))
            self.bank.add(name, model)
            self.used(name)
            self.seen[name] = _signature(target) or ()
            self.errors.pop(name, None)
            log.info("prefix %r installed through the admin endpoint", name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self, name: str) -> None:
        target = self.root / name
        if name not in self.bank and not target.exists():
            raise RequestError(404, f"unknown prefix {name!r}", code="model_not_found")
        if target.exists():
            trash = self._trash(name)
            os.replace(target, trash)
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        if name in self.bank:
            self.bank.remove(name)
        self.seen.pop(name, None)
        self.recent.pop(name, None)
        self.errors.pop(name, None)
        log.info("prefix %r deleted through the admin endpoint", name)
