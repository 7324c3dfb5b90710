"""Generation quality: BBC headline generation (article -> title) on SmolLM2-135M.

Rows: zero-shot with a discrete text prompt, prompt tuning, prefix tuning, full fine-tuning, all
with the same template, data, steps and greedy decoding, on a budget that fits 2 CPU cores.

    python -m benchmarks.generation [--quick]
    python -m benchmarks.generation --row prefix --train-size 640 --test-size 60 [--lr 0.03]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

from benchmarks.common import RESULTS, Finetune, emit, run_row

TEMPLATE = "Article: {text}\nHeadline:"
INSTRUCTION = "Write a short, factual news headline for the article."
ROWS = {  # name: (label, learning rate)
    "zero-shot": ("zero-shot, discrete text prompt", None),
    "prompt": ("prompt tuning", 3e-2),
    "prefix": ("prefix tuning", 1e-2),
    "full": ("full fine-tuning", 5e-5),
}


def build(row: str, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixtune import attach
    from prefixtune.assets import smollm2_path

    torch.manual_seed(seed)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if row == "full":
        return Finetune(base, "causal_lm", "all"), tokenizer
    if row == "zero-shot":
        return attach(base, tokenizer=tokenizer, method="text", text=INSTRUCTION + "\n"), tokenizer
    method = "prompt" if row == "prompt" else "prefix"
    return attach(base, tokenizer=tokenizer, method=method, num_virtual_tokens=16, text=INSTRUCTION), tokenizer


def run_one(args: argparse.Namespace) -> None:
    from prefixtune import tasks
    from prefixtune.assets import load_builtin_dataset
    from prefixtune.train import TrainConfig, train

    data = load_builtin_dataset("bbc_headline", seed=0)
    rows = list(data["train"])
    random.Random(args.seed).shuffle(rows)
    rows = rows[: args.train_size]
    test = list(data["test"])[: args.test_size]
    model, tokenizer = build(args.row, args.seed)
    train_s, steps = 0.0, 0
    lr = ROWS[args.row][1] if args.lr is None or ROWS[args.row][1] is None else args.lr
    if lr is not None:
        config = TrainConfig(
            output_dir=tempfile.mkdtemp(prefix="bench-gen-"),
            epochs=1,
            batch_size=8,
            learning_rate=lr,
            seed=args.seed,
            max_length=args.max_length,
            max_target_length=24,
            template=TEMPLATE,
            progress=False,
            log_every=1000,
            group_by_length=True,
        )
        start = time.perf_counter()
        result = train(model, tokenizer, rows, None, config)
        train_s, steps = time.perf_counter() - start, result.steps
    start = time.perf_counter()
    metrics = tasks.evaluate(
        model, tokenizer, test, max_length=args.max_length, batch_size=16, template=TEMPLATE, max_new_tokens=20
    )
    params = model.trainable_parameters()
    scores = {k: metrics[k] for k in ("rouge1", "rouge2", "rougeL", "bleu", "loss")}
    emit({"row": args.row, "lr": lr, "train_size": len(rows), "test_size": len(test), "steps": steps,
          "train_s": train_s, "eval_s": time.perf_counter() - start, "trainable": params["trainable"],
          "percent": params["percent"], **scores})  # fmt: skip


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--row", choices=sorted(ROWS))
    parser.add_argument("--train-size", type=int, default=640, help="one epoch at batch 8: 80 steps")
    parser.add_argument("--test-size", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="with --row: another learning rate than the row's")
    args = parser.parse_args(argv)
    if args.row:
        run_one(args)
        return None
    sizes = (
        ["--train-size", "16", "--test-size", "8", "--max-length", "128"]
        if args.quick
        else [
            "--train-size",
            str(args.train_size),
            "--test-size",
            str(args.test_size),
            "--max-length",
            str(args.max_length),
        ]
    )
    results = {"rows": {}}
    for name, (label, _) in ROWS.items():
        r = run_row("benchmarks.generation", ["--row", name, *sizes])
        results["rows"][name] = {"label": label, **r}
        print(f"  [{name}] ROUGE-L {r['rougeL']:.4f}  BLEU {r['bleu']:.2f}  ({r['wall_s']:.0f} s)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("generation-quick.json" if args.quick else "generation.json")).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
