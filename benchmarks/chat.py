"""Chat data end to end: a headline prefix trained on conversations from the CLI, then served through chat.

SmolLM2-135M-Instruct. The BBC articles become conversations (`--dataset bbc_headline_chat`: the user
asks for a headline for an article's opening, the assistant gives the real one). `prefixtune train`
learns a prefix on them with its defaults; the prefix is then served by `prefixtune serve`'s app,
and held-out test conversations go to `/v1/chat/completions` with the prefix and with the bare
instruct model, greedy. Scored by ROUGE-L F1 against the real headlines.

    python -m benchmarks.chat [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, emit
from prefixtune import cli
from prefixtune.assets import load_builtin_dataset, smollm2_path
from prefixtune.metrics import rouge_per_example

# What 2 CPU cores train in about 15 minutes: the step budget and batch are set, the rest is default.
TRAIN = {"max_train_samples": 800, "max_eval_samples": 32, "max_length": 192, "max_steps": 120, "batch_size": 8,
         "bf16": True}  # fmt: skip
QUICK = {"max_train_samples": 16, "max_eval_samples": 8, "max_length": 128, "max_steps": 2}
MAX_TOKENS = 24


def _served(prefix_dir: Path, conversations: list[list[dict]]) -> dict[str, list[str]]:
    """Greedy answers to every conversation from the server's chat endpoint, with the prefix and without."""
    import httpx

    from prefixtune.serving.app import create_app, running

    app = create_app(smollm2_path(), prefix_dir.parent, served_model_name="smollm2", reload_interval_s=None)
    answers: dict[str, list[str]] = {"prefix": [], "bare instruct model": []}
    with running(app, log_level="warning") as url, httpx.Client(base_url=url, timeout=300) as http:
        for model, key in ((prefix_dir.name, "prefix"), ("smollm2", "bare instruct model")):
            for messages in conversations:
                body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
                reply = http.post("/v1/chat/completions", json=body)
                reply.raise_for_status()
                answers[key].append(reply.json()["choices"][0]["message"]["content"].strip())
    return answers


def run(quick: bool, test_rows: int) -> dict:
    data = load_builtin_dataset("bbc_headline_chat")
    held_out = data["test"][:test_rows]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "headline"
        start = time.perf_counter()
        result = cli.train(model="smollm2", dataset="bbc_headline_chat", output_dir=str(out), progress=False,
                           **(QUICK if quick else TRAIN))  # fmt: skip
        train_s = time.perf_counter() - start
        record = json.loads((out / "prefixtune_train.json").read_text())
        asks = [c["messages"][:1] for c in held_out]
        start = time.perf_counter()
        answers = _served(out, asks)
        serve_s = time.perf_counter() - start
    references = [c["messages"][1]["content"] for c in held_out]
    scores = {k: [s["rougeL"] for s in rouge_per_example(v, references)] for k, v in answers.items()}
    return {
        "command": "python -m benchmarks.chat" + (" --quick" if quick else ""),
        "train_options": QUICK if quick else TRAIN,
        "data_format": record.get("data_format"),
        "steps": result.steps,
        "learning_rate": result.config.learning_rate,
        "num_virtual_tokens": record.get("num_virtual_tokens"),
        "validation_best": result.best_value,
        "test_conversations": len(held_out),
        "rougeL": {k: statistics.mean(v) for k, v in scores.items()},
        "prefix_better_rows": sum(a > b for a, b in zip(scores["prefix"], scores["bare instruct model"], strict=True)),
        "bare_better_rows": sum(a < b for a, b in zip(scores["prefix"], scores["bare instruct model"], strict=True)),
        "examples": [{"reference": r, **{k: v[i] for k, v in answers.items()}} for i, r in enumerate(references[:5])],
        "train_s": train_s,
        "serve_s": serve_s,
    }


def section(r: dict) -> str:
    lines = ["SmolLM2-135M-Instruct; `prefixtune train --model smollm2 --dataset bbc_headline_chat` with "
             f"{', '.join(f'{k} {v}' for k, v in r['train_options'].items())} and every other setting at its default "
             f"(data format detected: {r['data_format']}; {r['steps']} steps at learning rate {r['learning_rate']}). "
             f"Served by the server's app, {r['test_conversations']} held-out test conversations through "
             f"`/v1/chat/completions`, greedy, max_tokens {MAX_TOKENS}; ROUGE-L F1 against the real headlines.", "",
             "| model | ROUGE-L |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.4f} |" for k, v in r["rougeL"].items()]
    lines += ["", f"Per conversation: the prefix scored higher on {r['prefix_better_rows']}, the bare model on "
              f"{r['bare_better_rows']}. Training took {r['train_s'] / 60:.1f} min, serving both "
              f"{r['serve_s'] / 60:.1f} min.", "", "First answers:", ""]  # fmt: skip
    for ex in r["examples"]:
        lines.append(f"- real: {ex['reference']!r}; prefix: {ex['prefix']!r}; bare: {ex['bare instruct model']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rows and steps: a smoke test")
    parser.add_argument("--test-rows", type=int, default=None, help="held-out conversations to score (default 100)")
    args = parser.parse_args(argv)
    result = run(args.quick, args.test_rows or (4 if args.quick else 100))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("chat-quick.json" if args.quick else "chat.json")).write_text(json.dumps(result, indent=2))
    emit({k: result[k] for k in ("rougeL", "steps", "train_s")})
    return result


if __name__ == "__main__":
    main()
