"""Every option of every verb, declared once: the flags, the recipe keys and the Python keywords.

An option carries its type, default, choices and help text, so argparse, recipe checking and
`prefixtune <verb> --help` all read the same declaration. Prefix and training options are taken
from the fields (and help metadata) of `PrefixConfig` and `TrainConfig` themselves.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefixtune.cli import demo, recipes
from prefixtune.config import PrefixConfig
from prefixtune.errors import PrefixTuneError
from prefixtune.serving.limits import Settings
from prefixtune.train import TrainConfig
from prefixtune.train.defaults import SMALL_CLASSIFICATION_ROWS


@dataclass(frozen=True)
class Option:
    """One option, shared by the flag parser, recipes and the Python functions."""

    name: str
    type: Any = str  # str, int, float, bool, "ints", "strs"
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # defaults to --name-with-dashes

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def _prefix_help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(PrefixConfig) if f.name == name)


def _from_dataclass(cls: type, skip: Sequence[str] = (), rename: dict[str, str] | None = None) -> list[Option]:
    """Options built from a dataclass, so the --help text is the dataclass's own documentation."""
    hints = typing.get_type_hints(cls)
    rename = rename or {}
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        kind: Any = base
        if typing.get_origin(base) is list:
            kind = "ints" if typing.get_args(base)[0] is int else "strs"
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(Option(rename.get(f.name, f.name), kind, default, f.metadata.get("help", "")))
    return out


MODEL_OPTIONS = [
    Option("model", str, None, "Base model: 'minilm', 'smollm2' (bundled, offline), a local folder or a hub name."),
    Option(
        "task",
        str,
        "auto",
        "classification | causal_lm | seq2seq_lm. auto: classification when the data has labels, "
        "else causal or seq2seq LM from the model.",
        ("auto", "classification", "causal_lm", "seq2seq_lm"),
    ),
]
DATA_OPTIONS = [
    Option("dataset", str, None, "A bundled data set (research use): rotten_tomatoes | bbc_topic | bbc_headline."),
    Option("train_file", str, None, "Training data: .csv, .tsv, .json (list of objects) or .jsonl."),
    Option("validation_file", str, None, "Validation data, same format; used for evaluation during training."),
    Option("test_file", str, None, "Test data, same format; scored after training and by `evaluate`."),
    Option("hub_dataset", str, None, "A Hugging Face hub data set name (needs the network)."),
    Option("hub_config", str, None, "Configuration name of the hub data set."),
    Option("text_column", str, "text", "Column holding the input text."),
    Option("label_column", str, "label", "Column holding the class label (classification)."),
    Option("target_column", str, None, "Column holding the target text (generation); setting it means generation."),
    Option(
        "group_column",
        str,
        None,
        "Column that groups related rows (one movie, one author): a held-out validation part takes whole groups.",
    ),
    Option("data_seed", int, 0, "Seed of the bundled data sets' split and of the held-out validation part."),
    Option(
        "validation_fraction",
        float,
        0.1,
        "Without validation data, hold out this share of the training rows (seeded by --data-seed) for early "
        "stopping and for keeping the best prefix.",
    ),
    Option("max_train_samples", int, None, "Use only the first N training rows."),
    Option("max_eval_samples", int, None, "Use only the first N validation/test rows."),
]
PREFIX_OPTIONS = [
    *_from_dataclass(PrefixConfig, skip=("task", "seed", "text", "head_modules", "position_offset", "reparam")),
    Option(
        "reparam",
        str,
        None,
        _prefix_help("reparam") + f" Default: mlp for a classifier on fewer than {SMALL_CLASSIFICATION_ROWS:,} "
        "training rows, where it led direct on every small set measured; none otherwise.",
        ("none", "mlp"),
    ),
    Option("prefix_text", str, None, _prefix_help("text")),
    Option("head_modules", "strs", None, _prefix_help("head_modules")),
]
TRAIN_OPTIONS = [
    *_from_dataclass(TrainConfig),
    Option(
        "baseline",
        "strs",
        ["head"],
        "References scored beside a classifier on the same test rows: head (the frozen model with only a trained "
        "head, on cached features: one forward pass), tfidf (TF-IDF + logistic regression; scikit-learn), or none.",
    ),
]
# After a successful `train` only (not `tune`): the prefix, its training record and a model card go to the hub.
HUB_OPTIONS = [
    Option(
        "push_to_hub",
        str,
        None,
        "After a successful run, upload the prefix with a model card (README.md) to this Hugging Face Hub "
        "repository, user/name (created if missing; the token of `hf auth login` or HF_TOKEN). Only the prefix "
        "files and the card are sent: no checkpoints, logs or pickle.",
    ),
    Option("hub_revision", str, None, "Branch of the --push-to-hub repository to upload to (made from main if new)."),
    Option("hub_private", bool, False, "Create the --push-to-hub repository as a private one."),
]
RECIPE = Option("recipe", str, None, "YAML or JSON file of options (same names as the flags); flags win.")
PREFIX_DIR = Option("prefix", str, None, "Folder of a saved prefix (the output folder of `train`).", flag="--prefix")
OUTPUT = Option("output", str, None, "Write here (atomically) instead of stdout; .csv gives CSV, else JSONL.")
FORMAT = Option("format", str, None, "Output format: jsonl | csv (default: from the output suffix).", ("jsonl", "csv"))
GEN_OPTIONS = [
    Option("max_new_tokens", int, 32, "Most tokens to generate per text."),
    Option("num_beams", int, 1, "Beam search width (1: greedy)."),
    Option("do_sample", bool, False, "Sample instead of greedy/beam decoding."),
    Option("temperature", float, 1.0, "Sampling temperature."),
    Option("top_p", float, 1.0, "Nucleus sampling threshold."),
]
TRAINING_ONLY_DATA = ("train_file", "validation_file", "max_train_samples", "group_column", "validation_fraction")
EVAL_OPTIONS = [
    PREFIX_DIR,
    Option("model", str, None, "Base model; default: the one recorded when the prefix was trained."),
    *[o for o in DATA_OPTIONS if o.name not in TRAINING_ONLY_DATA],
    Option("split", str, "test", "Which split of a bundled or hub data set to score.", ("train", "validation", "test")),
    Option("batch_size", int, 64, "Examples per forward pass."),
    Option("max_length", int, None, "Longest input, prefix included; default: the value used in training."),
    Option("max_new_tokens", int, 32, "Tokens to generate when scoring generation."),
    Option("bf16", bool, False, "bfloat16 autocast."),
    Option("output", str, None, "Also write the metrics as JSON here (atomically)."),
]
PREDICT_OPTIONS = [
    PREFIX_DIR,
    Option("model", str, None, "Base model; default: the one recorded when the prefix was trained."),
    Option("input", str, None, "Texts: a .csv/.json/.jsonl file (its --text-column), a .txt file, or - for stdin."),
    Option("text_column", str, "text", "Column of the input file holding the text."),
    OUTPUT,
    FORMAT,
    Option("batch_size", int, 64, "Examples per forward pass."),
    Option("max_length", int, None, "Longest input, prefix included; default: the value used in training."),
]
GENERATE_OPTIONS = [
    *PREDICT_OPTIONS[:2],
    Option("prompt", "strs", None, "A text to continue or transform; repeat the flag for several."),
    *PREDICT_OPTIONS[2:],
    *GEN_OPTIONS,
]
INFO_OPTIONS = [
    PREFIX_DIR,
    Option("model", str, None, "Also check whether the prefix fits this base model."),
    Option("json", bool, False, "Print the information as JSON."),
]
DEMO_OPTIONS = [
    Option("output_dir", str, "prefixtune-demo", "Folder for the demo's prefix and logs."),
    Option(
        "train_samples",
        int,
        demo.TRAIN_SNIPPETS,
        "Training snippets (a seeded sample of the 10,164): fixed work, same figures.",
    ),
    Option("epochs", int, demo.EPOCHS, "Passes over the training snippets."),
    Option("num_virtual_tokens", int, demo.VIRTUAL_TOKENS, _prefix_help("num_virtual_tokens")),
    Option("learning_rate", float, demo.LEARNING_RATE, "Peak learning rate of the prefix (and of the head)."),
    Option("top_layers", int, demo.TOP_LAYERS, "How many of MiniLM's 6 layers, from the top, get the prefix."),
    Option("seed", int, demo.SEED, "Seed of the run."),
    Option("threads", int, None, "CPU threads for torch (default: torch's own, one per core); fixed for the run."),
    Option("precision", str, "auto", "auto: bf16 autocast where the CPU has native bf16, else float32; or force "
           "bf16 or float32 (a float32 machine's figures on any machine).", demo.PRECISIONS),
]
CONVERT_OPTIONS = [
    Option("model", str, None, "Base model the prefix belongs to ('smollm2', a folder or a hub name)."),
    Option("source", str, None, "A PEFT adapter folder (converted to prefixtune) or a prefixtune prefix folder."),
    Option("output", str, None, "Folder to write the converted prefix or adapter to."),
]
# `tune` takes every train option, so train recipes work. The ones it searches default to None ("search it")
# and a value given fixes them; a few others get the search's own defaults and help.
_TUNE_OVERRIDES = [
    Option("learning_rate", float, None, "Fix the peak learning rate; default: searched, log-uniform by --reparam."),
    Option("num_virtual_tokens", int, None, "Fix the prefix length; default: searched among 8, 16, 32, 64."),
    Option("reparam", str, None, "Fix it (none | mlp); default: searched for method 'prefix'.", ("none", "mlp")),
    Option("epochs", int, None, "Base budget in passes over the training rows; trials train 0.5x, 1x or 2x it."),
    Option("max_steps", int, None, "Base budget in optimizer steps (default: train's, max(1000, 5 epochs))."),
    Option("eval_every", int, 0, "Evaluate and report to the pruner every N steps; 0: a tenth of the base budget."),
    Option("patience", int, None, "Early stopping inside a trial, as in train (default 3 evaluations without "
           "improvement); 0: only the pruner stops a trial."),
    Option("baseline", "strs", None, "Ignored: tune never scores the test split (accepted so train recipes work)."),
    Option(
        "output_dir",
        str,
        "prefixtune-tune",
        "Folder for the search: trials/<n>/ (one prefix per trial), best/, trials.jsonl, trials.png, study.db.",
    ),
]
TUNE_OPTIONS = [
    *[
        next((t for t in _TUNE_OVERRIDES if t.name == o.name), o)
        for o in [*MODEL_OPTIONS, *DATA_OPTIONS, *PREFIX_OPTIONS, *TRAIN_OPTIONS]
    ],
    Option("trials", int, 20, "Trials to finish (complete or pruned) in the study; a rerun runs the missing ones."),
    Option("timeout", float, None, "Start no new trial after this many seconds (the running one finishes)."),
    Option(
        "pruner",
        str,
        "halving",
        "Stop bad trials early at their validation evaluations: halving (successive halving), median, or none.",
        ("halving", "median", "none"),
    ),
    Option(
        "storage",
        str,
        None,
        "Optuna storage URL (default: sqlite:///<output-dir>/study.db). Machines given the same URL "
        "(e.g. postgresql://user@host/db) and --study-name run one study together.",
    ),
    Option("study_name", str, "prefixtune", "Name of the study in the storage; the same name resumes it."),
]
_SERVER = Settings()  # the one home of each server default
SERVE_OPTIONS = [
    Option("model", str, None, "Base model: a folder, a hub name, or a built-in alias (smollm2, minilm)."),
    Option(
        "prefixes",
        str,
        None,
        "Folder with one subfolder per prefix (created if missing); watched. Hub prefixes too, comma-separated: "
        "NAME=user/repo (or user/repo@revision, or NAME=a prefix folder) or a bare user/repo (named after the "
        "repository), fetched once at start and copied into the folder (a temporary one when none is given).",
    ),
    Option("host", str, "127.0.0.1", "Address to listen on."),
    Option("port", int, 8000, "Port."),
    Option(
        "admin_token",
        str,
        None,
        "Token for /admin/prefixes; default: the PREFIXTUNE_ADMIN_TOKEN variable, the safer way (command lines "
        "are visible to other users). Without one the admin endpoints are disabled.",
    ),
    Option("served_model_name", str, None, "Id of the base model in requests (default: the folder's name)."),
    Option(
        "scheduler",
        str,
        _SERVER.scheduler,
        "How decoder requests share the model: 'continuous' (rows join and leave the running batch at every "
        "step) or 'batch' (requests arriving within --max-wait-ms run together to the end of the longest). "
        "Classification and encoder-decoders always batch.",
        ("continuous", "batch"),
    ),
    Option("max_batch_size", int, _SERVER.max_batch_size, "Rows per batch."),
    Option("max_wait_ms", float, _SERVER.max_wait_ms, "How long a request waits for others to batch with."),
    Option("max_cache_tokens", int, _SERVER.max_cache_tokens,
           "Continuous: KV-cache positions for all running rows (rows x the longest prompt + prefix + max_tokens); "
           "requests beyond wait in the queue."),  # fmt: skip
    Option("prefill_chunk", int, _SERVER.prefill_chunk, "Continuous: prompt tokens fed per decoding step."),
    Option("max_body_bytes", int, _SERVER.max_body_bytes, "Largest request body."),
    Option("max_upload_bytes", int, _SERVER.max_upload_bytes, "Largest admin upload."),
    Option("max_prompt_tokens", int, _SERVER.max_prompt_tokens, "Longest prompt."),
    Option("max_tokens_limit", int, _SERVER.max_tokens_limit, "Largest max_tokens."),
    Option("reload_interval", float, _SERVER.reload_interval_s, "Seconds between folder scans; 0: off."),
    Option("request_timeout", float, _SERVER.request_timeout_s, "Seconds before a request is abandoned."),
    Option("max_queue", int, _SERVER.max_queue, "Queued requests before answering 503."),
    Option("max_loaded_prefixes", int, _SERVER.max_loaded_prefixes,
           "Most prefixes held in memory: each is loaded when first asked for, and the least recently used "
           "one is dropped beyond this (it reloads from its folder when asked for again). 0: all, at start."),
    Option("timeout_keep_alive", int, _SERVER.timeout_keep_alive, "Seconds an idle connection stays open."),
    Option("device", str, None, "Torch device (default: cuda when available, else cpu)."),
    Option("dtype", str, None, "Model dtype (default: float32).", ("float32", "bfloat16", "float16")),
    Option("threads", int, None, "Torch CPU threads."),
    Option("log_level", str, _SERVER.log_level, "Log level.", ("critical", "error", "warning", "info", "debug")),
]
# The flags whose keyword in `prefixtune.serving.serve` (a `Settings` field) names its unit or is longer.
SERVE_KEYWORDS = {
    "reload_interval": "reload_interval_s",
    "request_timeout": "request_timeout_s",
    "threads": "num_threads",
}
VERB_OPTIONS: dict[str, list[Option]] = {
    "train": [*MODEL_OPTIONS, *DATA_OPTIONS, *PREFIX_OPTIONS, *TRAIN_OPTIONS, *HUB_OPTIONS],
    "evaluate": EVAL_OPTIONS,
    "predict": PREDICT_OPTIONS,
    "generate": GENERATE_OPTIONS,
    "info": INFO_OPTIONS,
    "demo": DEMO_OPTIONS,
    "convert": CONVERT_OPTIONS,
    "tune": TUNE_OPTIONS,
    "serve": SERVE_OPTIONS,
}
VERB_HELP = {
    "train": "Train a prefix on a frozen model and save it (with metrics.jsonl, curves.png, checkpoints).",
    "evaluate": "Score a saved prefix: accuracy and macro-F1, or ROUGE-1/2/L and BLEU.",
    "predict": "Classify (or generate for) texts from a file or stdin; write JSONL or CSV.",
    "generate": "Generate text with a causal-LM or seq2seq prefix.",
    "demo": "Train a sentiment prefix on MiniLM + Rotten Tomatoes beside a head-only baseline (about 3 minutes).",
    "info": "Show what a saved prefix holds and which base model it fits.",
    "convert": "Convert a PEFT PrefixTuning/PromptTuning adapter to a prefixtune prefix, or back.",
    "serve": "Serve many prefixes of one frozen model over an OpenAI-compatible HTTP API.",
    "tune": "Search learning rate, prefix length, reparam and steps on the validation split (Optuna, resumable).",
}


EXPECTED = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    "ints": "a list of integers",
    "strs": "a list of strings",
}


def _coerce(option: Option, value: Any, source: str) -> Any:
    """Check a recipe/Python value against the option's type (YAML reads '1e-2' as a string)."""
    if value is None:
        return None
    kind = option.type
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind in ("ints", "strs"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list):
                raise TypeError
            return [int(v) for v in items] if kind == "ints" else [str(v).strip() for v in items]
        if not isinstance(value, str):
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        expected = EXPECTED.get(kind, str(kind))
        raise PrefixTuneError(f"{source}option {option.name!r} must be {expected}, got {value!r}") from None
    if option.choices and value not in option.choices:
        raise PrefixTuneError(
            f"{source}option {option.name!r} must be one of {', '.join(option.choices)}, got {value!r}"
        )
    return value


def resolve_options(verb: str, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults, overridden by the recipe (if any), overridden by `given` (flags or keyword arguments)."""
    options = {o.name: o for o in VERB_OPTIONS[verb]}
    given = dict(given)
    recipe_path = given.pop("recipe", None)
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise PrefixTuneError(f"unknown option(s) for {verb}: {', '.join(unknown)}")
    recipe = recipes.load_recipe(recipe_path, options) if recipe_path else {}
    merged = recipes.merge(recipe, given)
    out = {name: o.default for name, o in options.items()}
    for name, value in merged.items():
        source = f"recipe {recipe_path}: " if name in recipe and given.get(name) is None else ""
        out[name] = _coerce(options[name], value, source)
    return out
