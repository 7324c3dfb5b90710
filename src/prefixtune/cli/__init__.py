"""`prefixtune`: train, evaluate, predict, generate, demo and info from the command line.

Every verb is also a Python function here (`train(**options)`, `evaluate(...)`, ...) taking the
same option names as the flags, with underscores (declared in `options.py`; data files and
splits are read in `data.py`, recipes in `recipes.py`, a run's model is built in `prepare.py`, the
`tune` search is `search.py` and the demo is `demo.py`). Options can also come
from a YAML/JSON recipe (`--recipe`); flags given on the command line win. Mistakes print one
`error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefixtune import serialization
from prefixtune.chat import FORMATS as CHAT_FORMATS
from prefixtune.cli.data import load_data, load_training_data
from prefixtune.cli.options import RECIPE, SERVE_KEYWORDS, VERB_HELP, VERB_OPTIONS, Option, resolve_options
from prefixtune.cli.prepare import build_model
from prefixtune.errors import PrefixTuneError
from prefixtune.model_card import TEST_METRICS
from prefixtune.train import TrainConfig, TrainResult, evaluate_rows
from prefixtune.train import train as train_prefix


# -------------------------------------------------------------------------------------------- verbs
def _print_table(rows: Sequence[tuple[str, Any]], title: str | None = None) -> None:
    from prefixtune.train.run_log import summary_table

    if title:
        print(title)
    print(summary_table(rows))


def train(**options: Any) -> TrainResult:
    """Load model and data, attach a prefix, train it, then score the test split and the baselines beside it."""
    from prefixtune import baselines

    opts = resolve_options("train", options)
    if not opts["model"]:
        raise PrefixTuneError("train needs --model (minilm, smollm2, a folder or a hub name)")
    baselines.check(opts["baseline"])
    if opts["push_to_hub"]:
        from prefixtune import hub

        hub.check_repo_id(opts["push_to_hub"])  # now, not after the run
    splits, label_names = load_training_data(opts)
    model, tokenizer, train_cfg = build_model(opts, splits["train"], label_names)
    info = {"model": opts["model"], "label_names": label_names, "dataset": opts["dataset"],
            "data_format": opts.get("data_format", "text")}  # fmt: skip
    result = train_prefix(model, tokenizer, splits["train"], splits["validation"], train_cfg, info)
    if _is_main_process():  # under `accelerate launch` the other processes are done
        _report(model, tokenizer, splits, opts, result)
        if opts["push_to_hub"]:
            _push(result.output_dir, opts)
    return result


def _push(folder: str, opts: dict) -> None:
    """Upload the trained prefix with its model card, which reads the test metrics `_report` just wrote."""
    from prefixtune import hub

    url = hub.push_to_hub(folder, opts["push_to_hub"], private=opts["hub_private"], revision=opts["hub_revision"])
    print(f"pushed to the hub: {url}")


def _report(model: Any, tokenizer: Any, splits: dict[str, list[dict]], opts: dict, result: TrainResult) -> None:
    """Score the test split (if any) and, for a classifier, the baselines beside it on the same rows."""
    from prefixtune import baselines

    cfg = result.config or TrainConfig()
    test_rows = splits.get("test")

    def score(rows: list[dict]) -> dict[str, Any]:
        return evaluate_rows(model, tokenizer, rows, cfg, with_generation=True)

    metrics: dict[str, Any] = {}
    if test_rows:
        metrics = score(test_rows)
        _print_table(list(metrics.items()), f"test ({len(test_rows)} rows)")
        result.last_eval = {f"test_{k}": v for k, v in metrics.items()} | result.last_eval
    kinds = [k for k in opts["baseline"] if k != "none"]
    if model.task == "classification" and kinds:
        split = "test" if test_rows else "validation"
        scored = splits[split]
        found = baselines.compare(
            model, tokenizer, kinds, splits["train"], scored, splits["validation"], max_length=cfg.max_length,
            batch_size=cfg.eval_batch_size, template=cfg.template, seed=cfg.seed,
        )  # fmt: skip
        prefix = metrics if test_rows else score(scored)  # the kept (best) prefix on the same rows
        rows: list[tuple[str, Any]] = [("prefix", prefix["accuracy"])]
        rows += [(name.replace("_", " "), m["accuracy"]) for name, m in found.items()]
        _print_table(rows, f"{split} accuracy beside the baselines ({len(scored)} rows)")
        metrics = {**prefix, "baselines": found}
    if metrics:
        name = TEST_METRICS if test_rows else "validation_baselines.json"
        serialization.write_json(Path(cfg.output_dir) / name, metrics)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _load_saved(opts: dict) -> tuple[Any, Any, dict]:
    from prefixtune import tasks

    if not opts.get("prefix"):
        raise PrefixTuneError("give --prefix (the folder `prefixtune train` wrote)")
    return tasks.load_prefix(opts["prefix"], opts.get("model"))


def evaluate(**options: Any) -> dict[str, float]:
    """Score a saved prefix on a split of a bundled/hub data set or on --test-file."""
    from prefixtune import tasks

    opts = resolve_options("evaluate", options)
    model, tokenizer, info = _load_saved(opts)
    if model.task == "classification":
        opts["target_column"] = None
    elif opts["target_column"] is None and (opts.get("test_file") or opts.get("hub_dataset")):
        raise PrefixTuneError("this is a generation prefix: give --target-column for the reference texts")
    opts["task"] = model.task
    splits, _ = load_data(opts, info.get("label_names"))
    split = "test" if opts.get("test_file") else opts["split"]
    if split not in splits:
        raise PrefixTuneError(f"the data has no {split!r} split (it has {', '.join(splits)})")
    rows = splits[split]
    max_length = opts["max_length"] or info.get("max_length") or 512
    metrics = tasks.evaluate(
        model,
        tokenizer,
        rows,
        max_length,
        opts["batch_size"],
        info.get("template", "{text}"),
        info.get("max_target_length"),
        opts["max_new_tokens"],
        bf16=opts["bf16"],
    )
    if opts["output"]:
        serialization.write_json(opts["output"], metrics)
    _print_table(list(metrics.items()), f"{split} ({len(rows)} rows)")
    return metrics


def predict(**options: Any) -> list[dict]:
    """Classify texts from a file or stdin; write JSONL or CSV to --output or stdout."""
    from prefixtune import tasks

    opts = resolve_options("predict", options)
    texts = tasks.read_texts(opts["input"], opts["text_column"])
    model, tokenizer, info = _load_saved(opts)
    records = tasks.predict(
        model,
        tokenizer,
        texts,
        info.get("label_names"),
        opts["max_length"] or info.get("max_length") or 512,
        opts["batch_size"],
        info.get("template", "{text}"),
    )
    tasks.write_records(records, opts["output"], opts["format"])
    return records


def generate(**options: Any) -> list[dict]:
    """Generate for --prompt texts or an input file/stdin with a causal-LM or seq2seq prefix."""
    from prefixtune import tasks

    opts = resolve_options("generate", options)
    texts = opts["prompt"] or tasks.read_texts(opts["input"], opts["text_column"])
    if not texts:
        raise PrefixTuneError("nothing to generate for: give --prompt or --input")
    model, tokenizer, info = _load_saved(opts)
    gen = {k: opts[k] for k in ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p")}
    chat_trained = info.get("data_format") in CHAT_FORMATS
    if chat_trained:  # served the way it learnt: each prompt a user turn, through the chat template
        print("note: the prefix learnt chat data; each prompt is a user turn in the chat template", file=sys.stderr)
    records = tasks.predict(
        model,
        tokenizer,
        [[{"role": "user", "content": t}] for t in texts] if chat_trained else texts,
        None,
        opts["max_length"] or info.get("max_length") or 512,
        opts["batch_size"],
        info.get("template", "{text}"),
        **gen,
    )
    for record, text in zip(records, texts, strict=True):
        record["text"] = text
    tasks.write_records(records, opts["output"], opts["format"])
    return records


def info(**options: Any) -> dict:
    """What a saved prefix holds (method, sizes, tensors, training record) and which base model it fits."""
    from prefixtune import tasks

    opts = resolve_options("info", options)
    if not opts["prefix"]:
        raise PrefixTuneError("give --prefix (a folder with prefixtune_config.json)")
    record = serialization.read_config(opts["prefix"])
    tensors = serialization.read_tensors(opts["prefix"])
    training = tasks.read_train_info(opts["prefix"])
    base = record.get("base_model", {})
    report: dict[str, Any] = {
        "prefix": record.get("prefix", {}),
        "task": record.get("task"),
        "base_model": base,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()
        },
        "parameters": int(sum(v.numel() for v in tensors.values())),
        "bytes": (Path(opts["prefix"]) / serialization.WEIGHTS_NAME).stat().st_size,
        "trained_on": {k: training.get(k) for k in ("model", "dataset", "label_names", "template") if k in training},
    }
    if opts["model"]:
        report["fits"] = _fits(opts["prefix"], opts["model"], record)
    if opts["json"]:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return report


def _fits(directory: str, model_name: str, record: dict) -> dict:
    """Load the base model's architecture and compare it with the identity recorded in the prefix."""
    from prefixtune import tasks
    from prefixtune.core.discovery import probe
    from prefixtune.model import IDENTITY_KEYS

    model, _, _ = tasks.load_model(model_name, record.get("task", "auto"), num_labels=2)
    found = probe(model).identity()
    expected = record.get("base_model", {})
    diff = [k for k in IDENTITY_KEYS if expected.get(k) != found.get(k)]
    return {"model": model_name, "fits": not diff, "differs_in": diff}


def _print_info(report: dict) -> None:
    cfg, base = report["prefix"], report["base_model"]
    rows: list[tuple[str, Any]] = [
        ("method", cfg.get("method")),
        ("virtual tokens", cfg.get("num_virtual_tokens")),
        ("layers", "all" if cfg.get("layers") is None else cfg.get("layers")),
        ("reparam", cfg.get("reparam")),
        ("pooling", cfg.get("pooling", "model")),
        ("task", report["task"]),
        ("parameters", f"{report['parameters']:,}"),
        ("file size", f"{report['bytes']:,} bytes"),
        ("base architecture", base.get("architecture")),
        ("base model", base.get("name_or_path") or "unnamed"),
    ]
    rows += [(f"base {k}", base.get(k)) for k in ("model_type", "num_layers", "hidden_size", "kv_heads", "head_dim")]
    rows += [(f"trained {k}", v) for k, v in report["trained_on"].items() if v is not None]
    if "fits" in report:
        fit = report["fits"]
        rows.append((f"fits {fit['model']}", "yes" if fit["fits"] else f"no ({', '.join(fit['differs_in'])})"))
    _print_table(rows)
    print("tensors:")
    for name, t in report["tensors"].items():
        print(f"  {name}: {tuple(t['shape'])} {t['dtype']}")


def demo(**options: Any) -> dict:
    """The README's main command: see `prefixtune.cli.demo`."""
    from prefixtune.cli.demo import run_demo

    opts = resolve_options("demo", options)
    return run_demo(**opts)


def convert(**options: Any) -> str:
    """PEFT adapter folder -> prefixtune prefix, or prefixtune prefix -> PEFT adapter folder."""
    from prefixtune import peft_interop, tasks

    missing = [f"--{n}" for n in ("model", "source", "output") if not options.get(n)]
    if missing:
        raise PrefixTuneError(f"convert needs {', '.join(missing)}")
    model, _, _ = tasks.load_model(options["model"])
    direction = peft_interop.convert(model, options["source"], options["output"])
    print(f"{direction}: {options['source']} -> {options['output']}")
    return direction


def tune(**options: Any) -> dict:
    """Search prefix hyperparameters on the validation split with Optuna: see `prefixtune.cli.search`."""
    from prefixtune.cli.search import run_search

    opts = resolve_options("tune", options)
    return run_search(opts)


def serve(**options: Any) -> None:
    """Serve many prefixes of one frozen model over an OpenAI-compatible HTTP API until interrupted;
    see `prefixtune.serving`. The admin token defaults to the PREFIXTUNE_ADMIN_TOKEN variable."""
    import logging
    import os

    try:
        from prefixtune.serving.app import serve as run_server
    except ImportError:  # the server's packages are an optional extra
        raise PrefixTuneError("prefixtune serve needs FastAPI and uvicorn: pip install 'prefixtune[serve]'") from None
    opts = resolve_options("serve", options)
    missing = [f"--{n}" for n in ("model", "prefixes") if not opts[n]]
    if missing:
        raise PrefixTuneError(f"serve needs {' and '.join(missing)}")
    opts = {SERVE_KEYWORDS.get(k, k): v for k, v in opts.items()}
    opts["admin_token"] = opts["admin_token"] or os.environ.get("PREFIXTUNE_ADMIN_TOKEN")
    opts["reload_interval_s"] = opts["reload_interval_s"] or None  # 0: no polling
    logging.basicConfig(level=opts["log_level"].upper(), format="%(levelname)s %(name)s: %(message)s")
    run_server(opts.pop("model"), opts.pop("prefixes"), **opts)


VERBS = {"train": train, "evaluate": evaluate, "predict": predict, "generate": generate, "info": info, "demo": demo,
         "convert": convert, "serve": serve, "tune": tune}  # fmt: skip


# --------------------------------------------------------------------------------------------- parser
def _add(parser: argparse.ArgumentParser, option: Option) -> None:
    shown = "" if option.default is None else f" (default: {option.default})"
    kwargs: dict[str, Any] = {"dest": option.name, "default": None, "help": option.help + shown}
    if option.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif option.type == "strs" and option.name == "prompt":
        kwargs["action"] = "append"
    elif option.type in ("ints", "strs"):
        kwargs["metavar"] = "A,B,..."
    else:
        kwargs["type"] = option.type
        if option.choices:
            kwargs["choices"] = option.choices
    parser.add_argument(option.flag_name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixtune",
        description="Prefix tuning for frozen Hugging Face transformers: train, evaluate, predict, generate.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, options in VERB_OPTIONS.items():
        p = sub.add_parser(verb, help=VERB_HELP[verb], description=VERB_HELP[verb])
        if verb in ("train", "evaluate", "predict", "generate", "serve", "tune"):
            _add(p, RECIPE)
        for option in options:
            _add(p, option)
    return parser


def _one_line_warnings(message: Any, category: Any, filename: str, lineno: int, line: Any = None) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; a PrefixTuneError becomes one `error: ...` line on stderr and exit code 2."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    verb = args.pop("verb")
    given = {k: v for k, v in args.items() if v is not None}
    previous = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings
    try:
        _quiet_libraries()
        VERBS[verb](**given)
    except PrefixTuneError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous
    return 0


def _quiet_libraries() -> None:
    """Keep transformers' load reports and advisory warnings off the user's terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
