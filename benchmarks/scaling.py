"""Scaling: train-step time and peak step memory against prefix length and against sequence length.

SmolLM2-135M, prefixtune, one process per point; memory is the exact peak tensor memory of a step
(`benchmarks/tensor_memory.py`). Prefix length 0 is
the frozen model with no prefix (forward + backward to the inputs).

    python -m benchmarks.scaling [--quick]
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import RESULTS, run_row

PREFIXES = (0, 4, 16, 64, 256)
SEQUENCES = (64, 128, 256, 512, 1024)


def point(prefix: int, seq: int, batch: int, repeats: int) -> dict:
    name = "frozen, no prefix" if prefix == 0 else "prefixtune"
    args = ["--memory", name, "--prefix", str(max(prefix, 1)), "--seq", str(seq), "--batch", str(batch),
            "--repeats", str(repeats)]  # fmt: skip
    return {**run_row("benchmarks.speed", args), "prefix": prefix}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (key, xs) in enumerate((("by_prefix", "prefix"), ("by_seq", "seq"))):
        pts = results[key]
        x = [p[xs] for p in pts]
        axes[0][col].plot(x, [p["step_s"] for p in pts], "o-")
        axes[1][col].plot(x, [p["peak_tensor_mb"] for p in pts], "o-", color="C1")
        axes[0][col].set_ylabel("train step (s)")
        axes[1][col].set_ylabel("peak step memory (MiB)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("symlog", linthresh=4) if xs == "prefix" else ax.set_xscale("log", base=2)
            ax.set_xlabel("prefix length P" if xs == "prefix" else "sequence length (tokens)")
            ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M, batch {results['batch']}, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three short points per axis: a smoke test")
    args = parser.parse_args(argv)
    batch, repeats = 2, 1  # one measured step per point after a warm-up step: sized for 2 cores
    prefixes = PREFIXES[:3] if args.quick else PREFIXES
    sequences = SEQUENCES[:2] if args.quick else SEQUENCES
    results = {"batch": batch, "by_prefix": [], "by_seq": []}
    for p in prefixes:
        results["by_prefix"].append(point(p, 64, batch, repeats))
        print(f"  P={p}: {results['by_prefix'][-1]['step_s']:.2f} s", flush=True)
    for s in sequences:
        results["by_seq"].append(point(16, s, batch, repeats))
        print(f"  seq={s}: {results['by_seq'][-1]['step_s']:.2f} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    name = "scaling-quick" if args.quick else "scaling"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(results, str(RESULTS / f"{name}.png"))
    return results


if __name__ == "__main__":
    main()
