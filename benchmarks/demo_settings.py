"""The demo's settings, chosen on validation: `prefixtune demo` scored on the bundled Rotten Tomatoes
validation split for each variant of training snippets x epochs, learning rate and prefix layers.

The demo has to finish in about three minutes on 2 cores, so what it can buy is a few passes over a few
thousand snippets; which mix of snippets, epochs, learning rate and cached layers buys the most is
measured here, on validation only, and the variant with the best validation accuracy is the demo's
(`prefixtune.cli.demo`'s constants). The test split is never read. Each variant runs in a process of its
own with the demo's fixed work and thread count, so its figures repeat; the walls include the head-only
baseline's pass, which fills the layer cache, and scoring the 1,280 validation rows.

    python -m benchmarks.demo_settings            # every variant not yet in results/demo_settings.json
    python -m benchmarks.demo_settings --row '{"train_samples": 6000, "epochs": 3}'   # one, prints its JSON
"""

from __future__ import annotations

import argparse
import json
import tempfile

from benchmarks.common import RESULTS, emit, run_row

# Overrides of the demo's own settings (train_samples, epochs, learning_rate, top_layers); {} is the demo as it is.
VARIANTS = [
    {"train_samples": 3000, "epochs": 4, "learning_rate": 0.05},
    {"train_samples": 3000, "epochs": 4, "learning_rate": 0.08},
    {"train_samples": 3000, "epochs": 3, "learning_rate": 0.05, "top_layers": 4},
    {"train_samples": 4500, "epochs": 4, "learning_rate": 0.05, "top_layers": 2},
    {"train_samples": 6000, "epochs": 3, "learning_rate": 0.05, "top_layers": 2},
    {"train_samples": 6000, "epochs": 3, "learning_rate": 0.05},
    {"train_samples": 6000, "epochs": 3, "learning_rate": 0.05, "top_layers": 4},
    {"train_samples": 6000, "epochs": 3, "learning_rate": 0.08},
    {"train_samples": 10164, "epochs": 2, "learning_rate": 0.05},
    {"train_samples": 10164, "epochs": 2, "learning_rate": 0.08},
    {"train_samples": 10164, "epochs": 2, "learning_rate": 0.05, "top_layers": 4},
]
PATH = RESULTS / "demo_settings.json"


def settings(variant: dict) -> dict:
    """The variant's full settings: the demo's constants, overridden by the variant."""
    from prefixtune.cli.demo import EPOCHS, LEARNING_RATE, TOP_LAYERS, TRAIN_SNIPPETS

    return {"train_samples": TRAIN_SNIPPETS, "epochs": EPOCHS, "learning_rate": LEARNING_RATE, "top_layers": TOP_LAYERS,
            **variant}  # fmt: skip


def score(variant: dict) -> dict:
    """One demo run with `variant`'s settings, scored on the validation split."""
    from prefixtune.cli.demo import run_demo

    full = settings(variant)
    with tempfile.TemporaryDirectory() as out:
        result = run_demo(output_dir=out, split="validation", **full)
    return {**full, "validation_accuracy": result["prefix_accuracy"],
            "head_only_validation_accuracy": result["head_only_accuracy"], "steps": result["steps"],
            "demo_wall_s": result["wall_seconds"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", help="one variant as JSON: run it here and print its result")
    p.add_argument("--quick", action="store_true", help="one tiny variant, to results/demo_settings-quick.json")
    a = p.parse_args(argv)
    if a.row:
        return emit(score(json.loads(a.row)))
    variants = [{"train_samples": 64, "epochs": 1}] if a.quick else VARIANTS
    path = RESULTS / "demo_settings-quick.json" if a.quick else PATH
    results = json.loads(path.read_text()) if path.exists() else {}
    done = results.setdefault("variants", [])  # resumable: a variant already scored is kept
    for variant in variants:
        if any(settings(variant).items() <= row.items() for row in done):
            continue
        done.append(run_row("benchmarks.demo_settings", ["--row", json.dumps(variant)]))
        print(f"  {variant}: validation {done[-1]['validation_accuracy']:.4f} ({done[-1]['wall_s']:.0f} s)", flush=True)
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
