"""Defaults, search and baselines: what a first run learns with nothing set, against a grid and a search.

For each bundled classification data set (Rotten Tomatoes, BBC topic) on MiniLM:
- `defaults`: `prefixtune train --model minilm --dataset NAME` with nothing else;
- `grid`: learning rate x prefix length x epochs, each point trained to its end (no early stopping)
  with the best of its 10 evaluations kept, chosen on validation;
- `search`: `prefixtune tune --trials N` as a user runs it (trials of half, once or twice `prefixtune train`'s
  budget, the first one its defaults), its compute counted in training examples seen;
- `small`: 800 training rows of Rotten Tomatoes as three classes (rotten, fresh, plot synopsis), where the
  defaults (on this few rows a prefix trained through the MLP), a direct prefix (`--reparam none`) alone,
  with `--head-init probe` and in the demo's recipe (the prefix in the top half of the layers, the layers
  below cached) face the head-only and TF-IDF baselines on the full test split, once per seed in
  SMALL_SEEDS; then the plain defaults and the direct prefix on other draws of 800 + 200 rows
  (SMALL_DRAWS), since which rows a user happens to have moves the lead as much as the seed does;
- `seeds`: the plain defaults and the grid's validation choice again with each seed in SEEDS, because one
  run's test accuracy moves by about a point with the seed alone, as much as the gaps the verdicts weigh.
The test split chooses nothing anywhere; each point's test score is shown for the record.

    python -m benchmarks.defaults [--quick]                 # every part, both data sets
    python -m benchmarks.defaults --parts small --datasets rotten_tomatoes
    python -m benchmarks.defaults --row defaults --dataset bbc_topic   # one row, prints its JSON
    python -m benchmarks.defaults --parts seeds --datasets rotten_tomatoes   # after the grid
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import RESULTS, emit, run_row
from prefixtune.cli.demo import TOP_LAYERS as DEMO_TOP_LAYERS
from prefixtune.train import TrainConfig

DATASETS = ("rotten_tomatoes", "bbc_topic")
GRID = {"learning_rate": [1e-2, 3e-2, 1e-1], "num_virtual_tokens": [8, 32], "epochs": [2, 5]}
SEARCH_SHARE = 1 / 3  # the search may spend at most this share of the grid's compute
SMALL = {"train": 800, "validation": 200}  # rows of the small data set (Rotten Tomatoes, three classes)
SMALL_SEEDS = (42, 1, 2)  # on 800 rows a single seed's lead over the head-only baseline moves by points
# Further samples of the small set (draw 0 is the one above), prefixtune train's seed: which 800 rows a user
# happens to have moves the lead over head only by as much as the seed does.
SMALL_DRAWS = (1, 2)
SEEDS = (1, 2)  # the `seeds` part's runs, beside the main rows' seed (prefixtune train's, 42)
SMALL_CATEGORIES = ("rotten", "fresh", "plot")  # a review's verdict, or a plot synopsis: the 800-row story
# The small set's runs besides the seed: the plain defaults (reparam None: unset), then a direct prefix alone,
# with LP-FT's probe-first head, and in the demo's recipe. The first SMALL_DRAW_VARIANTS run on every draw.
SMALL_VARIANTS = ({"reparam": None, "head_init": "random", "top_layers": 0},
                  {"reparam": "none", "head_init": "random", "top_layers": 0},
                  {"reparam": "none", "head_init": "probe", "top_layers": 0},
                  {"reparam": "none", "head_init": "random", "top_layers": DEMO_TOP_LAYERS})  # fmt: skip
SMALL_DRAW_VARIANTS = 2
MINILM_LAYERS = 6  # all-MiniLM-L6-v2
ROW_TIMEOUT = 4 * 3600  # a 5-epoch Rotten Tomatoes point takes about an hour on 2 cores
QUICK = {"max_train_samples": 96, "max_eval_samples": 48, "max_steps": 12}  # a smoke test of the pipeline


def train_run(dataset: str, quick: bool, **options) -> dict:
    """One `prefixtune.cli.train` run: validation best, test metrics, baselines, examples seen."""
    from prefixtune import cli

    with tempfile.TemporaryDirectory() as out:
        options = {"model": "minilm", "dataset": dataset, "output_dir": out, "progress": False, **options}
        start = time.perf_counter()
        result = cli.train(**options, **(QUICK if quick else {}))
        tested = json.loads((Path(out) / "test_metrics.json").read_text())
        prefix = json.loads((Path(out) / "prefixtune_config.json").read_text())["prefix"]
    return {
        "validation_accuracy": result.best_value,
        "accuracy": tested["accuracy"],
        "macro_f1": tested["macro_f1"],
        "baselines": {k: v["accuracy"] for k, v in tested.get("baselines", {}).items()},
        "steps": result.steps,
        "examples_seen": result.steps * result.config.batch_size,
        "learning_rate": result.config.learning_rate,
        "ran_reparam": prefix["reparam"],  # what an unset --reparam resolved to
        "budget": result.config.max_steps,
        "train_s": result.seconds,
        "wall_s": time.perf_counter() - start,
    }


def _search(dataset: str, quick: bool, trials: int) -> dict:
    """`prefixtune tune` on validation, then the best prefix scored once on test.

    The full run keeps its study in `benchmarks/results/search/<dataset>/`; study.db, trials.jsonl, trials.png
    and best/ (the winning prefix, under half a megabyte) are committed with the other results, the trial
    folders are not. So a run cut short continues where it stopped, as `prefixtune tune` does (on 2 cores one
    search can take longer than a working session), and best/ can be scored on test by whoever finishes it."""
    from prefixtune import cli

    keep = None if quick else RESULTS / "search" / dataset
    with tempfile.TemporaryDirectory() if keep is None else contextlib.nullcontext(str(keep)) as out:
        start = time.perf_counter()
        found = cli.tune(model="minilm", dataset=dataset, output_dir=out, trials=trials, progress=False,
                         **(QUICK if quick else {}))  # fmt: skip
        records = [json.loads(line) for line in (Path(out) / "trials.jsonl").read_text().splitlines()]
        tested = cli.evaluate(prefix=str(Path(out) / "best"), dataset=dataset, **(
            {"max_eval_samples": QUICK["max_eval_samples"]} if quick else {}))  # fmt: skip
    return {
        "validation_accuracy": found["best_value"],
        "accuracy": tested["accuracy"],
        "best_params": found["best_params"],
        "trials": found["trials"],
        "pruned": found["pruned"],
        "examples_seen": sum(r["steps"] or 0 for r in records) * TrainConfig().batch_size,
        "wall_s": time.perf_counter() - start,
    }


def small_rows(draw: int) -> dict[str, list[dict]]:
    """The small data set: samples (seeded by `draw`) of a three-class Rotten Tomatoes split (movies stay
    apart), the validation rows the sample left out (`held_back`), and the whole test split. Three classes
    because the 800-row CSV a new user brought had three."""
    from prefixtune.assets import load_rotten_tomatoes

    data = load_rotten_tomatoes(categories=SMALL_CATEGORIES)
    splits = {"test": list(data["test"])}
    for split, size in SMALL.items():
        rows = list(data[split])
        random.Random(draw).shuffle(rows)
        splits[split] = rows[:size]
        if split == "validation":
            splits["held_back"] = rows[size:]
    return splits


def small_files(root: Path, draw: int = 0, splits: tuple[str, ...] = ("train", "validation", "test")) -> dict[str, str]:
    """`splits` of the small set's draw as JSONL files in `root`."""
    files = {}
    for split, rows in small_rows(draw).items():
        if split in splits:
            files[split] = str(root / f"{split}.jsonl")
            Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def row(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--row", required=True, choices=("defaults", "grid", "search", "small"))
    p.add_argument("--dataset", default="rotten_tomatoes")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--num-virtual-tokens", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--head-init", default="random")
    p.add_argument("--reparam", choices=("none", "mlp"), help="small: set it (default: unset, sized to the data)")
    p.add_argument("--top-layers", type=int, default=0, help="small: the prefix in MiniLM's top N layers only, the "
                   "layers below cached (--layers, --cache-frozen-layers); 0: every layer")  # fmt: skip
    p.add_argument("--seed", type=int, default=TrainConfig().seed, help="the run's seed (default: prefixtune train's)")
    p.add_argument("--draw", type=int, default=0, help="small: which sample of the small set's rows")
    a = p.parse_args(argv)
    if a.row == "defaults":
        emit({"seed": a.seed, **train_run(a.dataset, a.quick, seed=a.seed)})
    elif a.row == "grid":
        point = {"learning_rate": a.learning_rate, "num_virtual_tokens": a.num_virtual_tokens, "epochs": a.epochs}
        emit({**point, "seed": a.seed, **train_run(a.dataset, a.quick, patience=0, baseline=["none"], seed=a.seed,
                                                **point)})  # fmt: skip
    elif a.row == "search":
        emit(_search(a.dataset, a.quick, a.trials))
    else:
        top = {"layers": top_layers(a.top_layers), "cache_frozen_layers": True} if a.top_layers else {}
        with tempfile.TemporaryDirectory() as root:
            files = small_files(Path(root), a.draw)
            emit({"reparam": a.reparam, "head_init": a.head_init, "top_layers": a.top_layers, "draw": a.draw,
                  "seed": a.seed, **train_run(None, a.quick, baseline=["head", "tfidf"], train_file=files["train"],
                                           validation_file=files["validation"], test_file=files["test"], seed=a.seed,
                                           head_init=a.head_init, reparam=a.reparam, **top)})  # fmt: skip


def top_layers(n: int) -> list[int]:
    """MiniLM's top `n` layer indices: where the small set's top-layers variant puts the prefix."""
    return list(range(MINILM_LAYERS - n, MINILM_LAYERS))


def _seeds(dataset: str, got: dict, flag: list[str], save: Callable[[], None]) -> None:
    """The plain defaults and the grid's validation choice once more per seed in SEEDS, each saved as it ends
    (resumable: a run already in `got["seeds"]` is kept)."""
    best = max(got["grid"], key=lambda g: g["validation_accuracy"])
    point = [f"--{k.replace('_', '-')}={best[k]}" for k in GRID]
    runs = got.setdefault("seeds", [])
    for seed in SEEDS[:1] if flag else SEEDS:
        for run, args in (("defaults", []), ("grid", point)):
            if any(r["run"] == run and r["seed"] == seed for r in runs):
                continue
            argv = ["--row", run, "--dataset", dataset, *args, "--seed", str(seed), *flag]
            runs.append({"run": run, **run_row("benchmarks.defaults", argv, timeout=ROW_TIMEOUT)})
            save()
            print(f"  {dataset} {run} seed {seed}: test {runs[-1]['accuracy']:.4f}", flush=True)


def grid_points() -> list[dict]:
    """Every grid point, the shorter runs first, so a grid stopped part-way has covered the most settings."""
    points = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    return sorted(points, key=lambda point: point["epochs"])


def _point_key(point: dict) -> tuple:
    return tuple(point[k] for k in GRID)


def _save(results: dict, quick: bool) -> None:
    path = RESULTS / ("defaults-quick.json" if quick else "defaults.json")
    path.write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> None:
    # No abbreviations: `--dataset` (a row's flag, passed through) must not be read as `--datasets`.
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="defaults,grid,search,small,seeds")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--row")
    a, rest = p.parse_known_args(argv)
    if a.row:
        return row(["--row", a.row, *(["--quick"] if a.quick else []), *rest])
    flag = ["--quick"] if a.quick else []
    path = RESULTS / ("defaults-quick.json" if a.quick else "defaults.json")
    results = json.loads(path.read_text()) if path.exists() else {}
    parts = a.parts.split(",")
    for dataset in a.datasets.split(","):
        got = results.setdefault(dataset, {})
        if "defaults" in parts:
            args = ["--row", "defaults", "--dataset", dataset, *flag]
            got["defaults"] = run_row("benchmarks.defaults", args, ROW_TIMEOUT)
            _save(results, a.quick)
        if "grid" in parts:
            # Resumable: a point already in the results file is kept, so a long grid can run in pieces.
            done = {_point_key(point) for point in got.setdefault("grid", [])}
            for point in grid_points():
                if _point_key(point) in done:
                    continue
                args = [f"--{k.replace('_', '-')}={v}" for k, v in point.items()]
                args = ["--row", "grid", "--dataset", dataset, *args, *flag]
                got["grid"].append(run_row("benchmarks.defaults", args, timeout=ROW_TIMEOUT))
                print(f"  {dataset} grid {point}: {got['grid'][-1]['validation_accuracy']:.4f}", flush=True)
                _save(results, a.quick)
        if "search" in parts:
            trials = 2 if a.quick else len(grid_points()) // 3
            args = ["--row", "search", "--dataset", dataset, "--trials", str(trials), *flag]
            got["search"] = run_row("benchmarks.defaults", args, timeout=ROW_TIMEOUT)
            _save(results, a.quick)
        if "seeds" in parts and got.get("grid"):
            _seeds(dataset, got, flag, lambda: _save(results, a.quick))
    if "small" in parts:  # each variant per seed, then the other draws; resumable, each run saved as it ends
        runs = results.setdefault("small", [])
        done = {_small_key(run) for run in runs}
        seeds = SMALL_SEEDS[:1] if a.quick else SMALL_SEEDS
        todo = [{**variant, "draw": 0, "seed": seed} for seed in seeds for variant in SMALL_VARIANTS]
        draws = SMALL_DRAWS[:1] if a.quick else SMALL_DRAWS
        todo += [{**variant, "draw": draw, "seed": TrainConfig().seed}
                 for draw in draws for variant in SMALL_VARIANTS[:SMALL_DRAW_VARIANTS]]  # fmt: skip
        for run in todo:
            if _small_key(run) in done:
                continue
            args = ["--head-init", run["head_init"], "--top-layers", str(run["top_layers"]), "--draw", str(run["draw"])]
            args += ["--reparam", run["reparam"]] if run["reparam"] else []
            runs.append(run_row("benchmarks.defaults", ["--row", "small", *args, "--seed", str(run["seed"]), *flag]))
            _save(results, a.quick)


def _small_key(run: dict) -> tuple:
    """A small-set run's variant, draw and seed; runs saved before the top-layers variant had every layer, and
    those saved before other draws existed are draw 0."""
    return run["reparam"], run["head_init"], run.get("top_layers", 0), run.get("draw", 0), run["seed"]


if __name__ == "__main__":
    main()
