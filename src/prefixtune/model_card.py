"""The README.md a prefix carries to the hub: front matter the hub indexes (library, tags, base model), then
what a person needs before using it: which base model, which method and size, what it was trained on, how
well it did and the lines that load it.

Why a module of its own: the facts come from two places, a live `PrefixModel` or a saved folder (the
config, the tensors and whatever the training run left beside them), and are rendered once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefixtune import serialization

CARD_NAME = "README.md"
# The same names as tasks.TRAIN_INFO and train.run_log.METRICS_LOG, spelled here because those modules
# import the model, which imports the hub module that this one serves (tests/test_hub.py checks they agree).
TRAIN_INFO = "prefixtune_train.json"
METRICS_LOG = "metrics.jsonl"
TEST_METRICS = "test_metrics.json"  # written by `prefixtune train` when there is a test split
# prefixtune's built-in aliases and the hub models they are (smollm2: dequantised once from its GGUF)
ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
AUTO_CLASS = {
    "classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
}
DESCRIBED = {
    "prefix": "prefix-tuning prefix (keys and values learnt for the attention layers)",
    "prompt": "soft prompt (prompt tuning: learnt input embeddings)",
    "text": "text prefix (the keys and values of a fixed text)",
}
PIPELINE = {
    "classification": "text-classification",
    "causal_lm": "text-generation",
    "seq2seq_lm": "text2text-generation",
}


@dataclass
class Facts:
    """What a card says, whichever source it came from."""

    prefix: dict
    task: str
    base: dict
    parameters: int
    info: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    return serialization.read_json_object(path) if path.is_file() else {}


def _best_validation(folder: Path, task: str, train_config: dict) -> dict:
    """The validation line of the kept prefix: the first best one by the run's metric, by the trainer's own rules
    (imported here: the training package imports the model, which imports the hub module this one serves)."""
    from prefixtune.train.config import TrainConfig, better, metric_name
    from prefixtune.train.run_log import MetricsLog

    metric = metric_name(TrainConfig(metric=train_config.get("metric", "auto")), task)
    best: dict = {}
    for line in MetricsLog(folder / METRICS_LOG, enabled=False).records():  # a line cut by a crash is skipped
        value = line.get(metric)
        if line.get("split") == "eval" and isinstance(value, (int, float)) and better(metric, value, best.get(metric)):
            best = line
    return best


def facts_of_folder(folder: str | os.PathLike, info: dict | None = None) -> Facts:
    """A saved prefix and what its training run left beside it (training record, test metrics, metrics log)."""
    folder = Path(folder)
    record = serialization.read_config(folder)
    parameters = sum(t.numel() for t in serialization.read_tensors(folder).values())
    info = {**_read_json(folder / TRAIN_INFO), **(info or {})}
    task = record.get("task", "")
    test = info.pop("test_metrics", None) or _read_json(folder / TEST_METRICS)
    validation = _best_validation(folder, task, info.get("train_config") or {})
    return Facts(record.get("prefix", {}), task, record.get("base_model", {}), parameters, info, test, validation)


def facts_of_model(model: Any, info: dict | None = None) -> Facts:
    """A live PrefixModel: its config, its base model's identity and the size of what it saves."""
    info = dict(info or {})
    parameters = sum(t.numel() for t in model.state_tensors().values())
    test = info.pop("test_metrics", None) or {}
    return Facts(model.prefix_config.to_dict(), model.task, model.layout.identity(), parameters, info, test)


def base_model_id(facts: Facts) -> str | None:
    """The base model as a hub id, for the front matter (a local path means nothing on the hub)."""
    from prefixtune.hub import is_hub_id

    for name in (facts.info.get("model"), facts.base.get("name_or_path")):
        if isinstance(name, str) and (name in ALIASES or is_hub_id(name)):
            return ALIASES.get(name, name)
    return None


def base_model_name(facts: Facts) -> str | None:
    """The base model as the card names it: a hub id, else the folder's last part (never a local path)."""
    name = base_model_id(facts) or facts.info.get("model") or facts.base.get("name_or_path")
    return Path(name).name + " (a local folder)" if name and Path(name).name != name else name


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    cells = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in rows if v not in (None, "", [])]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in cells)]


def _metrics(metrics: dict) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def render(facts: Facts, repo_id: str | None = None) -> str:
    """The card's markdown, front matter first."""
    method = facts.prefix.get("method", "prefix")
    base_id = base_model_id(facts)
    meta: dict[str, Any] = {"library_name": "prefixtune", "tags": ["prefixtune", "prefix-tuning", method]}
    if base_id:
        meta["base_model"] = base_id
    if facts.task in PIPELINE:
        meta["pipeline_tag"] = PIPELINE[facts.task]
    base_name = base_model_name(facts)
    loaded = base_id or "BASE_MODEL"  # what the usage lines load
    length = facts.prefix.get("num_virtual_tokens")
    layers = facts.prefix.get("layers")
    labels = facts.info.get("label_names")
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {repo_id or 'A prefixtune prefix'}",
        "",
        f"A {DESCRIBED.get(method, method)} of {length} virtual tokens for the frozen base model "
        f"`{base_name or 'not recorded'}`, trained with prefixtune. The base model is not in this repository: "
        f"only the prefix is, {facts.parameters:,} parameters in safetensors (no pickle).",
        "",
        *_table(
            [
                ("base model", f"`{base_name or 'not recorded'}` ({facts.base.get('architecture', '?')})"),
                ("method", method),
                ("prefix length", f"{length} virtual tokens"),
                ("layers", "all" if layers is None else ", ".join(map(str, layers))),
                ("reparameterisation", facts.prefix.get("reparam")),
                ("task", facts.task),
                ("trainable parameters", f"{facts.parameters:,}"),
                ("data set", facts.info.get("dataset") or "not recorded"),
                ("labels", ", ".join(map(str, labels)) if labels else None),
                ("template", f"`{facts.info['template']}`" if facts.info.get("template") else None),
            ]
        ),
    ]
    if facts.test or facts.validation:
        lines += ["", "## Results", ""]
        if facts.test:
            lines += ["Test split, with the kept prefix:", "", *_table(_metrics(facts.test)), ""]
        if facts.validation:
            step = facts.validation.get("step")
            scores = [(k, v) for k, v in _metrics(facts.validation) if k not in ("step", "epoch")]
            lines += [f"Validation at step {step}, where the kept prefix was saved:", "", *_table(scores), ""]
    auto = AUTO_CLASS.get(facts.task, "AutoModel")
    head = f", num_labels={len(labels)}" if facts.task == "classification" and labels else ""
    lines += [
        "",
        "## Use it",
        "",
        "```python",
        f"from transformers import {auto}",
        "from prefixtune import PrefixModel",
        "",
        f'base = {auto}.from_pretrained("{loaded}"{head})',
        f'model = PrefixModel.from_pretrained(base, "{repo_id or "path/to/this/folder"}")',
        "```",
        "",
        "or serve it beside other prefixes of the same base model over an OpenAI-compatible API:",
        "",
        "```bash",
        f"prefixtune serve --model {loaded} --prefixes {repo_id or 'NAME=path/to/this/folder'}",
        "```",
        "",
    ]
    return "\n".join(lines)


def model_card(model: Any, info: dict | None = None, *, repo_id: str | None = None) -> str:
    """README.md for a prefix: `model` is a PrefixModel or a saved prefix folder; `info` is a training record
    (what prefixtune_train.json holds: model, dataset, label_names, template, train_config) and may carry
    `test_metrics`. From a folder, the record, test_metrics.json and metrics.jsonl beside it are read too."""
    if isinstance(model, (str, os.PathLike)):
        facts = facts_of_folder(model, info)
    else:
        facts = facts_of_model(model, info)
    return render(facts, repo_id)
