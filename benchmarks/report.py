"""Turn benchmarks/results/*.json into BENCHMARKS.md: tables, targets met or not, and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, markdown_table, paired_ratio_interval
from benchmarks.defaults import DATASETS, SMALL, SMALL_CATEGORIES, grid_points, top_layers
from benchmarks.speed import TOP_HALF
from prefixtune.train.defaults import SMALL_CLASSIFICATION_ROWS


def _load(name: str, quick: bool) -> dict | None:
    suffix = "-quick" if quick else ""
    path = RESULTS / f"{name}{suffix}.json"
    return {**json.loads(path.read_text()), "suffix": suffix} if path.exists() else None


def _image(name: str, suffix: str) -> str:
    """A plot link that works from BENCHMARKS.md (repository root) or from results/BENCHMARKS-quick.md."""
    return f"![{name}]({'' if suffix else 'benchmarks/results/'}{name}{suffix}.png)"


VALIDATION_ROWS = 1280  # the bundled Rotten Tomatoes validation split, which the demo's settings are checked on
CLEAR_LEAD = 3.0  # points over the head-only baseline that count as a clear win: the demo's bar, and the small set's
PLAIN = "prefix, plain defaults"
DIRECT = "prefix, `--reparam none`"  # the small set's plain defaults train through the MLP; this is without


def _small_label(run: dict) -> str:
    """A small-set run's variant, as the flags that differ from the plain defaults."""
    flags = [f"--reparam {run['reparam']}"] if run["reparam"] else []
    if run["head_init"] != "random":
        flags.append(f"--head-init {run['head_init']}")
    top = run.get("top_layers", 0)  # runs saved before that variant existed had the prefix in every layer
    if top:
        flags.append(f"--layers {','.join(map(str, top_layers(top)))} --cache-frozen-layers")
        return f"prefix, top {top} layers (`{' '.join(flags)}`)"
    return f"prefix, `{' '.join(flags)}`" if flags else PLAIN


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _speed(r: dict) -> str:
    t, g, m, rss = r["train_step_s"], r["generate_tok_s"], r["peak_step_memory_mb"], r["peak_rss_step_mb"]
    s = r["setup"]
    rows = [[k, f"{v:.3f}", f"{v / t['prefixtune']:.2f}", f"{m[k]:.1f}", f"{rss[k]:.0f}"] for k, v in t.items()]
    out = [f"SmolLM2-135M, batch {s['batch']}, {s['seq']} tokens, prefix {s['prefix']}, {s['threads']} threads; "
           f"medians of {s['repeats']} alternating repeats. Peak step memory: the exact peak of tensor memory "
           "that one training step creates (forward, loss, backward, gradients; `benchmarks/tensor_memory.py`), "
           "each variant in its own process; it is the same on every run. Beside it, resident memory above the "
           "loaded model, sampled every 2 ms, which swings by tens of MiB between runs because the allocator "
           "keeps freed pages. The top-half row is not a target row: it puts the prefix on layers 15-29 only, "
           "so the backward pass stops halfway.", "",
           markdown_table(["training step", "seconds", "× prefixtune", "peak step memory (MiB)",
                           "sampled RSS (MiB)"], rows), ""]  # fmt: skip
    gen_rows = [[k, f"{v:.1f}", f"{v / g['base model']:.3f}"] for k, v in g.items()]
    out += [f"Generation: batch {s['gen_batch']}, {s['new_tokens']} new tokens, greedy.", "",
            markdown_table(["generation", "tokens/s", "× base model"], gen_rows), ""]  # fmt: skip
    ours, peft, frozen = t["prefixtune"], t["PEFT prefix tuning"], t["frozen, no prefix"]
    c = r["checkpointing"]
    cut = 1 - c["on"]["peak_tensor_mb"] / c["off"]["peak_tensor_mb"]
    targets = [
        ["training step ≤ 0.85 × PEFT", f"{ours / peft:.2f} ×", _mark(ours <= 0.85 * peft)],
        ["training step ≤ 1.05 × frozen no-prefix", f"{ours / frozen:.2f} ×", _mark(ours <= 1.05 * frozen)],
        ["generation ≥ 0.97 × base", f"{g['prefixtune'] / g['base model']:.3f} ×", _mark(g["prefixtune"] >= 0.97 * g["base model"])],
        ["peak memory ≤ PEFT", f"{m['prefixtune']:.1f} vs {m['PEFT prefix tuning']:.1f} MiB",
         _mark(m["prefixtune"] <= m["PEFT prefix tuning"])],
        [f"checkpointing cuts peak memory ≥ 40% at {s['checkpointing_seq']} tokens",
         f"{c['off']['peak_tensor_mb']:.0f} → {c['on']['peak_tensor_mb']:.0f} MiB ({100 * cut:.0f}% less)",
         _mark(cut >= 0.40)],
    ]  # fmt: skip
    out.append(markdown_table(["target", "measured", ""], targets))
    if frozen > 0.85 * peft:  # the floor itself misses the target
        out += ["", f"**Why ≤ 0.85 × PEFT is out of reach here.** A prefix on every layer gets its gradient only "
                "through the frozen model's whole forward pass and its backward pass down to layer 0: that is the "
                f"frozen no-prefix row, and it measured {frozen / peft:.2f} × PEFT, so no implementation of the same "
                f"computation reaches 0.85 ×. prefixtune is {ours / frozen:.2f} × that floor and PEFT "
                f"{peft / frozen:.2f} ×. A reference measurement of the same setup, taken beside a first prototype of "
                "prefixtune (PEFT 2.09 s/step, full fine-tuning 3.73 s), left room that PEFT 0.21 under "
                "transformers 5 no longer leaves. What does cut the step is a shorter "
                f"backward pass: the top-half row measured {t[TOP_HALF] / peft:.2f} × PEFT."]  # fmt: skip
    return "\n".join(out)


def _classification(r: dict) -> str:
    rows, few_rows = [], []
    for row in r["rows"].values():
        f = row["full"]
        rows.append([row["label"], f["accuracy"], f["macro_f1"], f"{f['trainable']:,} ({f['percent']:.3f}%)",
                     f.get("best_epoch", "-"), f"{f['train_s']:.0f}", f"{f['peak_rss_mb']:.0f}",
                     f"{f['wall_s']:.0f}", f"{row['lr']:g}"])  # fmt: skip
        few_rows.append([row["label"], f"{row['few_mean']:.4f} ± {row['few_std']:.4f}", f"{row['few_lr']:g}",
                         f"{sum(x['wall_s'] for x in row['few']):.0f}"])  # fmt: skip
    first = next(iter(r["rows"].values()))["full"]
    pooling = "the mean of the last hidden states" if r.get("pooling") == "mean" else "the model's [CLS] pooler"
    out = [f"MiniLM (all-MiniLM-L6-v2, frozen except where a row trains it) on the Rotten Tomatoes test split "
           f"(split by movie); every head reads {pooling}. {r['train_size']} training examples, up to "
           f"{first['epochs']} epochs ({first['steps']} steps) at batch 32. Each run evaluates on "
           f"{r['validation_size']} validation examples after every epoch and keeps its best epoch; each row "
           "trains once per learning rate of its 2-point grid and the run with the better validation accuracy "
           "is the one reported, so the test split chose nothing.", "",
           markdown_table(["method", "accuracy", "macro-F1", "trainable params", "best epoch", "train (s)",
                           "peak RSS (MiB)", "wall (s)", "lr"], rows), "",
           f"Low data: {r['low_data_size']} training examples, up to "
           f"{next(iter(r['rows'].values()))['few'][0]['epochs']} epochs at batch 16, best epoch kept on "
           f"{r.get('low_data_validation_size', r['validation_size'])} validation examples, learning rate picked "
           f"at seed {r['seeds'][0]}, then seeds {r['seeds']}: test accuracy mean ± std.", "",
           markdown_table(["method", "accuracy", "lr", "wall (s, all seeds)"], few_rows)]  # fmt: skip
    rr = r["rows"]
    if "prefix" in rr and "full" in rr:
        p, f = rr["prefix"], rr["full"]
        gap = f["full"]["accuracy"] - p["full"]["accuracy"]
        out += ["", markdown_table(["target", "measured", ""], [
            ["prefix tuning within 1 point of full fine-tuning", f"{100 * gap:+.1f} points behind",
             _mark(gap <= 0.01)],
            ["with ≤ 2% trainable parameters", f"{p['full']['percent']:.3f}%", _mark(p["full"]["percent"] <= 2)],
            [f"{r['low_data_size']} examples: prefix ≥ full fine-tuning", f"{p['few_mean']:.4f} vs {f['few_mean']:.4f}",
             _mark(p["few_mean"] >= f["few_mean"])],
        ])]  # fmt: skip
    _bar_plot(r, RESULTS / f"classification{r['suffix']}.png")
    out += ["", _image("classification", r["suffix"])]
    swept = _load("classification-sweep", False) if not r["suffix"] and "full" in rr else None
    if swept and "runs" in swept:
        out += ["", _sweep(swept, rr)]
    if swept and "low_data" in swept:
        out += ["", _low_data_sweep(swept["low_data"], rr)]
    if swept and "runs" in swept and len(swept.get("long", {}).get("runs", {})) == 2:
        out += ["", _long_sweep(swept, rr)]
        if "low_data" in swept:
            out += ["", _why_out_of_reach(swept, rr)]
    return "\n".join(out)


def _long_sweep(swept: dict, rows: dict) -> str:
    """The best prefix and full fine-tuning with a longer schedule: is the gap a matter of training time?"""
    s = swept["long"]
    long = {"prefix": s["runs"]["prefix"], "full": s["runs"]["full"]}
    same = ("row", "lr", "prefix_length", "reparam_hidden")
    short = {"prefix": next(r for r in swept["runs"] if all(r[k] == long["prefix"][k] for k in same)),
             "full": rows["full"]["full"]}  # fmt: skip
    labels = {
        "prefix": f"prefix, P = {long['prefix']['prefix_length']}, {_prefix_kind(long['prefix'])}",
        "full": rows["full"]["label"],
    }
    table = [[labels[k], f"{long[k]['lr']:g}", f"{short[k]['epochs']} → {long[k]['epochs']}",
              f"{short[k]['best_epoch']} → {long[k]['best_epoch']}",
              f"{short[k]['validation_accuracy']:.4f} → {long[k]['validation_accuracy']:.4f}",
              f"{short[k]['accuracy']:.4f} → {long[k]['accuracy']:.4f}"] for k in ("prefix", "full")]  # fmt: skip

    def gap(runs: dict, key: str) -> str:
        return f"{100 * (runs['full'][key] - runs['prefix'][key]):+.1f}"

    return "\n".join([
        f"Longer schedule (`python -m benchmarks.classification --long-sweep`, "
        f"{sum(r['wall_s'] for r in long.values()) / 60:.1f} min): the capacity sweep's best prefix setting and "
        f"full fine-tuning at the table's learning rate, both trained for up to {s['epochs']} epochs on the same "
        f"{s['train_size']} examples, best validation epoch kept.", "",
        markdown_table(["method", "lr", "epochs", "best epoch", "validation accuracy", "test accuracy"], table), "",
        f"Full fine-tuning ahead on validation by {gap(long, 'validation_accuracy')} points with {s['epochs']} "
        f"epochs ({gap(short, 'validation_accuracy')} with {short['full']['epochs']}), on test by "
        f"{gap(long, 'accuracy')} ({gap(short, 'accuracy')}).",
    ])  # fmt: skip


def _prefix_kind(run: dict) -> str:
    return f"MLP {run['reparam_hidden']}" if run["row"] == "prefix-mlp" else "direct"


def _prefix_settings(rows: dict, runs: list[dict]) -> list[tuple[str, float]]:
    """The table's prefix grids and these sweep runs, where ≤ 2% of parameters train, with validation accuracy."""
    found = [(f"{rows[k]['label']}, lr {lr}", v) for k in ("prefix", "prefix-text", "prefix-mlp")
             if k in rows and rows[k]["full"]["percent"] <= 2 for lr, v in rows[k]["validation"].items()]  # fmt: skip
    found += [(f"{_prefix_kind(r)}, P = {r['prefix_length']}, lr {r['lr']:g}, {r['epochs']} epochs",
               r["validation_accuracy"]) for r in runs if r["percent"] <= 2]  # fmt: skip
    return found


def _why_out_of_reach(swept: dict, rows: dict) -> str:
    """The two classification targets, judged against everything the table and the sweeps trained."""
    settings = _prefix_settings(rows, [*swept["runs"], swept["long"]["runs"]["prefix"]])
    name, best = max(settings, key=lambda x: x[1])
    full = max(rows["full"]["validation"].values())  # the table's full fine-tuning, which the target names
    longer = swept["long"]["runs"]["full"]["validation_accuracy"]
    out = []
    if full - best > 0.01:
        out.append(
            f"**Why within 1 point is out of reach here.** Choosing on validation can pick a prefix within a point "
            f"of full fine-tuning only if some prefix setting gets there on validation. Of the {len(settings)} "
            f"prefix settings with ≤ 2% trainable parameters trained above (the table's grids, the capacity sweep "
            f"and the longer schedule: prefix length 16 or 64, direct or through an MLP, vocabulary or text start, "
            f"several learning rates, 6 or {swept['long']['epochs']} epochs) the best reaches {best:.4f} ({name}), "
            f"{100 * (full - best):.1f} points behind the table's full fine-tuning on validation ({full:.4f}; "
            f"{longer:.4f} with the longer schedule). Every one of them lands between "
            f"{min(v for _, v in settings):.4f} and {best:.4f}. "
            "P-tuning v2 reports parity with fine-tuning from about 330 M parameters up (BERT-large, "
            "RoBERTa-large); all-MiniLM-L6-v2 has 22.7 M and is the only encoder that installs here. What would "
            "close the gap: the same tables on such an encoder where the hub is reachable."
        )  # fmt: skip
    low = swept["low_data"]["rows"]
    prefixes = [n for n in low if n != "full"]
    short = {n: rows["full"]["few_mean"] - rows[n]["few_mean"] for n in prefixes}  # full's lead, table schedule
    long = {n: low["full"]["mean"] - low[n]["mean"] for n in prefixes}  # and with the longer schedule
    ahead = all(f["accuracy"] > p["accuracy"] for n in prefixes
                for f, p in zip(low["full"]["runs"], low[n]["runs"], strict=True))  # fmt: skip
    if ahead and all(long[n] > short[n] > 0 for n in prefixes):
        leads = "; ".join(f"{rows[n]['label']} {100 * short[n]:+.1f} → {100 * long[n]:+.1f} points" for n in prefixes)
        out.append(
            f"**Why the {swept['low_data']['train_size']}-example target is out of reach here.** Full fine-tuning's "
            f"lead over the prefixes grows when every row trains longer ({rows['full']['few'][0]['epochs']} → "
            f"{swept['low_data']['epochs']} epochs: {leads}), and with the longer schedule it is ahead at every "
            "seed. Li & Liang's low-data advantage was measured on generation (table-to-text, summarisation) with "
            "GPT-2-medium and BART-large, where the frozen model already writes fluent text and the prefix steers "
            "it; here the prefix has to turn a 22.7 M-parameter encoder's features into a sentiment classifier. "
            "Neither a setting nor more training closes this gap; a larger encoder is what the literature says "
            "would."
        )  # fmt: skip
    return "\n\n".join(out)


def _full_ahead(full: dict, prefix: dict, label: str, short_gap: float, short_epochs: int) -> str:
    ahead = sum(f["accuracy"] > p["accuracy"] for f, p in zip(full["runs"], prefix["runs"], strict=True))
    return (f"Full fine-tuning against {label} with the longer schedule: ahead on test at {ahead} of "
            f"{len(prefix['runs'])} seeds, by {100 * (full['mean'] - prefix['mean']):+.1f} points on average "
            f"({100 * short_gap:+.1f} with {short_epochs} epochs).")  # fmt: skip


def _low_data_sweep(s: dict, rows: dict) -> str:
    """The low-data rows with a longer schedule: is the prefix's deficit a matter of training time?"""

    def seeds(runs: list[dict], key: str) -> str:
        return " / ".join(f"{x[key]:.3f}" for x in runs)

    table = []
    for name, longer in s["rows"].items():
        short = rows[name]
        table.append([short["label"], f"{longer['lr']:g}",
                      f"{short['few_mean']:.4f} ± {short['few_std']:.4f}", seeds(short["few"], "accuracy"),
                      f"{longer['mean']:.4f} ± {longer['std']:.4f}", seeds(longer["runs"], "accuracy"),
                      seeds(longer["runs"], "validation_accuracy"),
                      " / ".join(str(x["best_epoch"]) for x in longer["runs"])])  # fmt: skip
    epochs = rows["full"]["few"][0]["epochs"]
    wall = sum(x["wall_s"] for row in s["rows"].values() for x in row["runs"]) / 60
    return "\n".join([
        f"Low data, longer schedule (`python -m benchmarks.classification --low-data-sweep`, {wall:.1f} min): the "
        f"same {s['train_size']} examples, learning rates and seeds {s['seeds']} as the low-data table, trained for "
        f"up to {s['epochs']} epochs instead of {epochs}, still keeping each run's best validation epoch. Test "
        "accuracy, mean ± std and per seed:", "",
        markdown_table(["method", "lr", f"{epochs} epochs", "per seed", f"{s['epochs']} epochs", "per seed",
                        "validation per seed", "best epoch"], table), "",
        *[_full_ahead(s["rows"]["full"], row, rows[name]["label"], rows["full"]["few_mean"] - rows[name]["few_mean"],
                      epochs) for name, row in s["rows"].items() if name != "full"],
    ])  # fmt: skip


def _sweep(s: dict, rows: dict) -> str:
    """The capacity sweep, against full fine-tuning's validation accuracy: can tuning close the gap?"""
    full = max(rows["full"]["validation"].values())
    runs = [("MLP" if r["row"] == "prefix-mlp" else "direct", r) for r in s["runs"]]
    table = [[kind, r["prefix_length"], r["reparam_hidden"] if kind == "MLP" else "-", f"{r['lr']:g}",
              f"{r['trainable']:,} ({r['percent']:.2f}%)", r["best_epoch"], r["validation_accuracy"],
              f"{100 * (r['validation_accuracy'] - full):+.1f}", r["accuracy"]] for kind, r in runs]  # fmt: skip
    table_grid = [(rows[k]["label"], lr, v, rows[k]["full"]["percent"]) for k in ("prefix", "prefix-text", "prefix-mlp")
                  if k in rows for lr, v in rows[k]["validation"].items()]  # fmt: skip
    best = max(v for _, v in _prefix_settings(rows, s["runs"]))
    out = [f"Capacity sweep (`python -m benchmarks.classification --sweep`, {s['train_size']} training examples, "
           f"{sum(r['wall_s'] for r in s['runs']) / 60:.1f} min; same schedule and validation as the table): "
           "settings outside the table's grids, to ask whether the gap to full fine-tuning is a matter of "
           f"tuning. Full fine-tuning's best validation accuracy is {full:.4f}; the column 'vs full' is each run's "
           "validation accuracy minus that. Test accuracy is shown for the record; nothing was chosen by it.", "",
           markdown_table(["prefix", "P", "MLP width", "lr", "trainable while training", "best epoch",
                           "validation accuracy", "vs full (points)", "test accuracy"], table), "",
           "The table's own grids on validation: " + "; ".join(f"{label} lr {lr}: {v:.4f}"
                                                               for label, lr, v, _ in table_grid) + ".", "",
           f"Best validation accuracy of any prefix setting with ≤ 2% trainable parameters: {best:.4f}, "
           f"{100 * (full - best):.1f} points behind full fine-tuning on the split that chooses."]  # fmt: skip
    return "\n".join(out)


def _bar_plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in r["rows"].values()]
    full = [row["full"]["accuracy"] for row in r["rows"].values()]
    few = [row["few_mean"] for row in r["rows"].values()]
    err = [row["few_std"] for row in r["rows"].values()]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], full, 0.4, label=f"{r['train_size']} examples")
    ax.bar([i + 0.2 for i in x], few, 0.4, yerr=err, label=f"{r['low_data_size']} examples (3 seeds)")
    ax.set_xticks(list(x), labels, rotation=20, ha="right")
    ax.set_ylim(0.45, max(full + few) + 0.05)
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _generation(r: dict) -> str:
    def setting(lr: float, reparam: str | None) -> str:
        return f"lr {lr:g}" + (", through the MLP" if reparam == "mlp" else "")

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        first, second = r["rows"][a], r["rows"][b]
        low, high = paired_ratio_interval(first["rougeL_per_article"], second["rougeL_per_article"])
        return first["rougeL"] / max(second["rougeL"], 1e-9), low, high

    rows = [[row["label"], row["rouge1"], row["rouge2"], row["rougeL"], f"{row['bleu']:.2f}",
             f"{row['trainable']:,}", row["steps"], setting(row["lr"], row["reparam"]) if row["lr"] else "-",
             row["validation_rougeL"], f"{row['train_s']:.0f}", f"{row['wall_s']:.0f}"]
            for row in r["rows"].values()]  # fmt: skip
    first = next(iter(r["rows"].values()))
    grid_s = sum(g["wall_s"] for row in r["rows"].values() for g in row["validation"])
    seeds_s = sum(x["wall_s"] for row in r["rows"].values() for x in row.get("seeds", [])[1:])
    walls = f"The runs' wall times add up to {grid_s / 60:.1f} min for the grids" + (
        f" and {seeds_s / 60:.1f} min for the extra seeds." if seeds_s else ".")  # fmt: skip
    out = [f"SmolLM2-135M, BBC headline generation: {first['train_size']} training articles (1 epoch, batch 8), "
           f"all {first['test_size']} test articles, greedy, 20 new tokens. Every trained row uses the same "
           f"template, data and steps; prompts and prefixes have {first['prefix_length'] or 16} virtual tokens. "
           "Each trains once per point of its grid and is scored on "
           f"{first['validation_size']} validation articles; the run with the best validation ROUGE-L is the one "
           "reported, so the test split chose nothing. Train and wall times are those of the chosen run. " + walls, "",
           markdown_table(["method", "ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU", "trainable", "steps", "chosen",
                           "validation ROUGE-L", "train (s)", "wall (s)"], rows), "",
           "Validation ROUGE-L of every grid point:", ""]  # fmt: skip
    out += [f"- {row['label']}: " + "; ".join(f"{setting(g['lr'], g['reparam'])}: {g['validation_rougeL']:.4f}"
                                             for g in row["validation"])
            for row in r["rows"].values() if row["lr"] is not None]  # fmt: skip
    if {"prefix", "full", "zero-shot"} <= r["rows"].keys():
        rr = r["rows"]
        full, full_low, full_high = ratio("prefix", "full")
        zero, zero_low, zero_high = ratio("prefix", "zero-shot")
        seeded = all("seeds" in rr[k] for k in ("prefix", "full"))
        target = ["prefix ROUGE-L ≥ 0.95 × full fine-tuning", f"{full:.2f} ×", f"{full_low:.2f}–{full_high:.2f}",
                  "seed 0 only" if seeded else _mark(full >= 0.95)]  # fmt: skip
        targets = [target]
        if seeded:
            mean, low, high = _seed_ratio(rr["prefix"]["seeds"], rr["full"]["seeds"])
            seeds = ", ".join(str(x["seed"]) for x in rr["prefix"]["seeds"])
            targets.append([f"the same, mean over seeds {seeds}", f"{mean:.2f} ×", f"{low:.2f}–{high:.2f}",
                            _mark(mean >= 0.95)])  # fmt: skip
        targets.append(["prefix clearly above zero-shot (interval above 1.2 ×)", f"{zero:.2f} ×",
                        f"{zero_low:.2f}–{zero_high:.2f}", _mark(zero_low > 1.2)])  # fmt: skip
        out += ["", "Ratios of test ROUGE-L, with 95% paired bootstrap intervals (10,000 resamples of the test "
                "articles, each resample scoring both rows on the same articles"
                + ("; over seeds, each article's score is its mean over the seeds" if seeded else "") + "):", "",
                markdown_table(["target", "measured", "95% interval", ""], targets)]  # fmt: skip
        on_validation = rr["prefix"]["validation_rougeL"] / max(rr["full"]["validation_rougeL"], 1e-9)
        out += ["", f"The same two runs on the {first['validation_size']} validation articles: prefix "
                f"{rr['prefix']['validation_rougeL']:.4f}, full fine-tuning {rr['full']['validation_rougeL']:.4f}, "
                f"{on_validation:.2f} ×."]  # fmt: skip
        if seeded:
            out += ["", _seed_table(rr)]
    return "\n".join(out)


def _seed_ratio(numerator: list[dict], denominator: list[dict]) -> tuple[float, float, float]:
    """Ratio of the two rows' mean test ROUGE-L over seeds, and its paired interval over articles."""

    def per_article(runs: list[dict]) -> list[float]:
        return [sum(scores) / len(scores) for scores in zip(*(x["rougeL_per_article"] for x in runs), strict=True)]

    a, b = per_article(numerator), per_article(denominator)
    low, high = paired_ratio_interval(a, b)
    return sum(a) / max(sum(b), 1e-9), low, high


def _seed_table(rows: dict) -> str:
    """The target's two rows at every seed: how much one draw of training articles moves them."""
    table = []
    for name in ("prefix", "full"):
        runs = rows[name]["seeds"]
        test = [x["rougeL"] for x in runs]
        table.append([rows[name]["label"], " / ".join(f"{x:.4f}" for x in test),
                      f"{statistics.mean(test):.4f} ± {statistics.stdev(test):.4f}",
                      " / ".join(f"{x['validation_rougeL']:.4f}" for x in runs)])  # fmt: skip
    per_seed = " / ".join(f"{p['rougeL'] / max(f['rougeL'], 1e-9):.2f}"
                          for p, f in zip(rows["prefix"]["seeds"], rows["full"]["seeds"], strict=True))  # fmt: skip
    seeds = " / ".join(str(x["seed"]) for x in rows["prefix"]["seeds"])
    return "\n".join([
        f"Seeds: prefix tuning and full fine-tuning with their chosen settings at seeds {seeds} (seed 0 is the run "
        "that chose them; each seed draws its own 640 training articles and their order). Test ROUGE-L per seed "
        "and mean ± std:",
        "", markdown_table(["method", f"test ROUGE-L, seeds {seeds}", "mean ± std", "validation ROUGE-L"], table),
        "", f"Prefix over full fine-tuning at each seed: {per_seed} ×.",
    ])  # fmt: skip


def _serving(r: dict) -> str:
    from benchmarks.serving import client_levels, table

    g = r["generation"]
    rows = [
        ["mixed batch ≥ 0.95 × one-prefix throughput", f"{g['mixed_vs_single_throughput']:.2f} ×",
         _mark(g["mixed_vs_single_throughput"] >= 0.95)],
        ["mixed batch ≥ 3 × faster than 8 sequential rows", f"{g['mixed_speedup_vs_sequential']:.2f} ×",
         _mark(g["mixed_speedup_vs_sequential"] >= 3)],
    ]  # fmt: skip
    server = r["server"]
    if "continuous" in server and "16" in server["continuous"]:
        new, old = server["continuous"], server["batch"]
        speed = new["16"]["tokens_per_s"] / old["16"]["tokens_per_s"]
        latency = new["16"]["p50_s"] / old["16"]["p50_s"]
        scale = new["4"]["tokens_per_s"] / new["1"]["tokens_per_s"]
        rows += [
            ["continuous, 16 clients: ≥ 1.7 × the dynamic batcher's tokens/s", f"{speed:.2f} ×", _mark(speed >= 1.7)],
            ["continuous, 16 clients: p50 latency ≤ 0.5 × the dynamic batcher's", f"{latency:.2f} ×",
             _mark(latency <= 0.5)],
            ["continuous: 4 clients ≥ 2.5 × one client's tokens/s", f"{scale:.2f} ×", _mark(scale >= 2.5)],
            ["continuous, 16 clients: time to first token p50 ≤ 1 s", f"{new['16']['ttft_p50_s']:.2f} s",
             _mark(new["16"]["ttft_p50_s"] <= 1)],
        ]  # fmt: skip
    many = r.get("many")
    if many:
        rows.append([f"{many['prefixes']:,} prefixes, requests over {many['used']}: ≥ 0.9 × one prefix's tokens/s",
                     f"{many['spread_vs_one']:.2f} × ({many['rss_mb_loaded']:.0f} MiB resident)",
                     _mark(many["spread_vs_one"] >= 0.9)])  # fmt: skip
    s = r["setup"]
    levels = client_levels(server.get("continuous", {}))
    per_client = ", ".join(f"{run['requests'] // int(c)} requests per client at {c}" for c, run in levels.items())
    one_thread = _load("serving-threads1", False)
    extra = ""
    if one_thread and "continuous" in one_thread.get("server", {}):
        new, old = one_thread["server"]["continuous"], one_thread["server"]["batch"]
        lines = [[name, c, f"{run['tokens_per_s']:.1f}", f"{run['p50_s']:.2f}", f"{run['ttft_p50_s']:.2f}"]
                 for name, runs in one_thread["server"].items() for c, run in client_levels(runs).items()]  # fmt: skip
        extra = (
            "\n\nThe server rows again with torch on 1 thread, leaving the second core to HTTP and the 16 client "
            "processes (`python -m benchmarks.serving --parts server --threads 1 --out "
            "benchmarks/results/serving-threads1.json`); torch's default, one thread per core, is the published "
            "row and the faster one:\n\n"
            + markdown_table(["scheduler", "clients", "tokens/s", "p50 latency (s)", "first token p50 (s)"], lines)
            + f"\n\nWith 1 thread: continuous/batch tokens/s at 16 clients "
            f"{new['16']['tokens_per_s'] / old['16']['tokens_per_s']:.2f} x, p50 latency "
            f"{new['16']['p50_s'] / old['16']['p50_s']:.2f} x, 4 clients / 1 client "
            f"{new['4']['tokens_per_s'] / new['1']['tokens_per_s']:.2f} x."
        )
    return (f"SmolLM2-135M, {s['rows']} rows, prefix length {s['prefix_len']}, {s['new_tokens']} new tokens, "
            f"{s['threads']} threads. The server rows: 4 prefixes and the bare model, streamed greedy completions "
            f"with max_tokens drawn from {s.get('server_max_tokens', [32, 32])[0]}-"
            f"{s.get('server_max_tokens', [32, 32])[1]}, one process per client, one server process per "
            f"scheduler, the schedulers and levels taking turns over two rounds, the same requests for both "
            f"({per_client}). A level ends with a drain, its last requests running while the clients that are "
            f"done wait. `rows per call` is the mean count of rows a continuous decoding step or a batcher's "
            f"`generate` call held; `ms per step` is the level's wall time per forward of the model (prefills "
            f"included), `rows per step` the rows such a forward carried, and `row-steps with a token` the share "
            f"of those rows that made a token (the batcher's finished rows step on to the end of their call).\n\n"
            f"{table(r)}\n\n{markdown_table(['target', 'measured', ''], rows)}{_latency_bound(server)}{extra}")  # fmt: skip


def _latency_bound(server: dict) -> str:
    """What the 16-client targets would take, from the run's own step counts (empty when both are met)."""
    new, old = server.get("continuous", {}).get("16"), server.get("batch", {}).get("16")
    if not new or not old or "row_steps_with_a_token" not in new:
        return ""
    speed = new["tokens_per_s"] / old["tokens_per_s"]
    if speed >= 1.7 and new["p50_s"] <= 0.5 * old["p50_s"]:
        return ""
    clients = 16
    shape = {k: run["p50_s"] / (clients / run["requests_per_s"]) for k, run in (("new", new), ("old", old))}
    needed = 2 * shape["new"] / shape["old"]  # requests/s ratio that p50 <= 0.5 x needs, at these shapes
    useful = new["row_steps_with_a_token"] / old["row_steps_with_a_token"]
    cost = {k: run["ms_per_step"] / run["rows_per_step"] for k, run in (("new", new), ("old", old))}
    now = useful * cost["old"] / cost["new"]  # the throughput ratio these two figures give

    def cheaper(ratio: float) -> str:
        return (f"{ratio:.2f} × would take continuous row-steps costing at most {useful / ratio:.2f} × the "
                f"batcher's on the same model, {1 - now / ratio:.0%} less than now")  # fmt: skip

    return (
        "\n\n**What the 16-client targets would take.** With 16 clients that each wait for their answer, the mean "
        f"latency is about 16 / requests/s (Little's law): {clients / new['requests_per_s']:.2f} s for continuous "
        f"batching, {clients / old['requests_per_s']:.2f} s for the batcher, and the p50 sits at "
        f"{shape['new']:.2f} and {shape['old']:.2f} of those means. So p50 ≤ 0.5 × needs "
        f"{needed:.2f} × the batcher's requests/s (the same requests: about its tokens/s too), and the tokens/s "
        f"target 1.70 ×. What continuous batching saves is the steps of finished rows: "
        f"{new['row_steps_with_a_token']:.0%} of its row-steps made a token against the batcher's "
        f"{old['row_steps_with_a_token']:.0%}, {useful:.2f} × as many tokens per row-step. The two run the same "
        f"model, and on 2 cores a step of a dozen rows is bound by arithmetic (SmolLM2's linear layers take "
        f"time in proportion to the rows beyond a few), so a row-step costs about the same in both: "
        f"{cost['new']:.1f} ms of wall time for continuous batching, {cost['old']:.1f} ms for the batcher (the "
        f"prompts that ride in its steps, one for each request it completes, make its rows dearer). Together "
        f"they give {now:.2f} ×; " + "; ".join(cheaper(r) for r in (1.7, needed) if r > now) + "."
    )


def _scaling(r: dict) -> str:
    rows = [[p["prefix"], 64, round(p["step_s"], 3), round(p["peak_tensor_mb"], 1)] for p in r["by_prefix"]]
    rows += [[16, p["seq"], round(p["step_s"], 3), round(p["peak_tensor_mb"], 1)] for p in r["by_seq"]]
    return (f"SmolLM2-135M, prefixtune, batch {r['batch']}; prefix 0 is the frozen model without a prefix.\n\n"
            + markdown_table(["prefix length", "sequence length", "train step (s)", "peak step memory (MiB)"], rows)
            + "\n\n" + _image("scaling", r["suffix"]))  # fmt: skip


def _defaults(r: dict) -> str:
    """Plain defaults against the validation-chosen grid point and the search, per data set; the small set."""
    out = [
        "MiniLM, every head reading the mean of the last hidden states. The grid (learning rate x prefix length x "
        "epochs) trains each point to its end, keeping the best of its 10 evaluations; the grid and the search "
        "choose on validation only. Compute is training examples seen (optimizer steps x batch)."
    ]
    for name in [k for k in r if k in DATASETS]:
        got = r[name]
        rows, line = [], []
        grid = got.get("grid") or []
        best = max(grid, key=lambda g: g["validation_accuracy"]) if grid else None
        partial = len(grid) < len(grid_points())
        best_mark = " (best so far)" if partial else " (best)"
        if got.get("defaults"):
            d = got["defaults"]
            rows.append(
                [
                    "plain defaults",
                    f"{d['learning_rate']:g}",
                    "16",
                    f"{d['steps']} of {d['budget']} steps",
                    d["validation_accuracy"],
                    d["accuracy"],
                    f"{d['examples_seen']:,}",
                ]
            )
        for g in sorted(grid, key=lambda g: -g["validation_accuracy"]):
            rows.append(
                [
                    f"grid{best_mark if g is best else ''}",
                    f"{g['learning_rate']:g}",
                    g["num_virtual_tokens"],
                    f"{g['epochs']} epochs",
                    g["validation_accuracy"],
                    g["accuracy"],
                    f"{g['examples_seen']:,}",
                ]
            )
        if got.get("search"):
            se, p = got["search"], got["search"]["best_params"]
            rows.append(
                [
                    f"search ({se['trials']} trials, {se['pruned']} pruned)",
                    f"{p['learning_rate']:.3g}",
                    p["num_virtual_tokens"],
                    f"{p['steps']} steps, reparam {p.get('reparam')}",
                    se["validation_accuracy"],
                    se["accuracy"],
                    f"{se['examples_seen']:,}",
                ]
            )
        out += [
            "",
            f"**{name}**",
            "",
            markdown_table(
                ["run", "lr", "P", "schedule", "validation accuracy", "test accuracy", "compute (examples)"], rows
            ),
        ]
        if got.get("defaults", {}).get("baselines"):
            d = got["defaults"]
            line.append(
                "Beside the plain defaults on the same test rows: "
                + ", ".join(
                    f"{k.replace('_', ' ')} {v:.4f} ({100 * (d['accuracy'] - v):+.1f} points for the prefix)"
                    for k, v in d["baselines"].items()
                )
                + "."
            )
        if grid and partial:
            line.append(
                f"The grid is partial ({len(grid)} of {len(grid_points())} points, the shortest runs first), "
                "so no verdict is drawn against it."
            )
        seeded = bool(best and got.get("seeds") and got.get("defaults")) and _seeds_complete(got["seeds"])
        if best and not partial:
            # Met only when the gap holds both on validation (what the grid chose by) and on test.
            for run, label, within in (("defaults", "Plain defaults", 1.0), ("search", "Search", 0.5)):
                if not got.get(run):
                    continue
                val = 100 * (got[run]["validation_accuracy"] - best["validation_accuracy"])
                test = 100 * (got[run]["accuracy"] - best["accuracy"])
                share = got[run]["examples_seen"] / sum(g["examples_seen"] for g in grid)
                cheap = run == "defaults" or share <= 1 / 3
                line.append(
                    f"{label} vs the grid's validation choice: {val:+.2f} points on validation, {test:+.1f} on "
                    f"test" + ("" if run == "defaults" else f", with {share:.0%} of the grid's compute")
                    + (" (one seed; the verdict reads the seed means below)." if seeded else
                       f" ({_mark(min(val, test) >= -within - 1e-9 and cheap)} within {within:g} point"
                       + ("" if run == "defaults" else " at most a third of the compute") + ").")
                )  # fmt: skip
        out += ["", " ".join(line)] if line else []
        if best and not partial and got.get("seeds") and got.get("defaults"):
            out += ["", _seed_means(got, best)]
    if r.get("small"):
        out += ["", _small(r["small"])]
    return "\n".join(out)


def _seeds_complete(seeds: list[dict]) -> bool:
    """Whether the `seeds` part ran as many seeds for the grid's choice as for the plain defaults."""
    return sum(r["run"] == "defaults" for r in seeds) == sum(r["run"] == "grid" for r in seeds)


def _seed_means(got: dict, best: dict) -> str:
    """The plain defaults and the grid's validation choice over several seeds: the verdicts on their means.

    One run's test accuracy moves by about a point with the seed alone, as much as the 1 and 0.5 point
    margins, so a single run's gap says little; the means over the main rows' seed and the `seeds` part's do."""
    runs = {"defaults": [got["defaults"]], "grid": [best]}
    for extra in got["seeds"]:
        runs[extra["run"]].append(extra)
    rows = [[f"{'plain defaults' if run == 'defaults' else 'grid choice'}", r.get("seed", 42), r["validation_accuracy"],
             r["accuracy"]] for run, rs in runs.items() for r in rs]  # fmt: skip

    def mean(run: str, key: str) -> float:
        return 100 * sum(r[key] for r in runs[run]) / len(runs[run])

    val, test = (mean("defaults", k) - mean("grid", k) for k in ("validation_accuracy", "accuracy"))
    spread = [100 * (max(r["accuracy"] for r in rs) - min(r["accuracy"] for r in rs)) for rs in runs.values()]
    seeds = len(runs["defaults"])
    if len(runs["grid"]) != seeds:
        return (f"The `seeds` part is partial ({seeds} run(s) of the plain defaults, {len(runs['grid'])} of the grid's "
                "choice), so no verdict is drawn from it yet.\n\n"
                + markdown_table(["run", "seed", "validation accuracy", "test accuracy"], rows))
    text = (
        f"Over {seeds} seeds (the table's and `--parts seeds`), one setting's test accuracy spans up to "
        f"{max(spread):.1f} points. Seed means, plain defaults vs the grid's validation choice "
        f"(lr {best['learning_rate']:g}, P {best['num_virtual_tokens']}, {best['epochs']} epochs): {val:+.2f} points "
        f"on validation, {test:+.2f} on test ({_mark(min(val, test) >= -1.0)} within "
        "1 point)."
    )
    search = got.get("search", {}).get("best_params", {})
    d = got["defaults"]
    if search and (search.get("learning_rate"), search.get("num_virtual_tokens"), search.get("steps")) == (
        d["learning_rate"], 16, d["budget"]) and search.get("reparam") in (None, "none"):  # fmt: skip
        share = got["search"]["examples_seen"] / sum(g["examples_seen"] for g in got["grid"])
        text += (
            f" The search chose the plain defaults' setting with {share:.0%} of the grid's compute, so the same "
            f"means hold for it ({_mark(min(val, test) >= -0.5 and share <= 1 / 3)} within 0.5 point at most a "
            "third of the compute)."
        )
    return "\n".join([text, "", markdown_table(["run", "seed", "validation accuracy", "test accuracy"], rows)])


def _small(runs: list[dict]) -> str:
    """The small set, one run per draw, seed and variant: the prefix's lead over the head-only baseline.

    On 800 rows the lead moves by a point or two with the seed, and by more with which rows were drawn, so
    the verdict weighs each draw alike (its seeds averaged first): a clear win leads by CLEAR_LEAD points
    on average over the draws, and in no run falls behind."""
    rows, summary = [], []
    for label in sorted(dict.fromkeys(map(_small_label, runs)), key=lambda label: label != PLAIN):  # plain first
        mine = sorted((run for run in runs if _small_label(run) == label), key=lambda run: run.get("draw", 0))
        leads = [100 * (run["accuracy"] - run["baselines"]["head_only"]) for run in mine]
        by_draw: dict[int, list[float]] = {}
        for run, lead in zip(mine, leads, strict=True):
            draw = run.get("draw", 0)  # runs saved before other draws existed are draw 0
            by_draw.setdefault(draw, []).append(lead)
            rows.append([label, draw, run["seed"], run["validation_accuracy"], run["accuracy"], run["steps"],
                         run["baselines"]["head_only"], run["baselines"].get("tfidf", ""), f"{lead:+.1f}"])  # fmt: skip
        draw_means = {draw: statistics.mean(got) for draw, got in by_draw.items()}
        mean = statistics.mean(draw_means.values())
        clear = mean >= CLEAR_LEAD and min(leads) > 0
        per_draw = ", ".join(f"draw {d} {m:+.1f} ({len(by_draw[d])} seed(s))" for d, m in draw_means.items())
        summary.append(
            f"{label}: {mean:+.1f} points on average over {len(draw_means)} draw(s) ({per_draw}), runs "
            f"{min(leads):+.1f} to {max(leads):+.1f}"
            + (f" (a clear win: {_mark(clear)})" if label == PLAIN else "")
        )
    summary.append(_paired(runs, PLAIN, DIRECT))
    return "\n".join([
        f"Small data set: {SMALL['train']} Rotten Tomatoes training rows as three classes "
        f"({', '.join(SMALL_CATEGORIES)}; {SMALL['validation']} validation rows, split by movie), on the whole "
        "test split. Draw 0 is one sample of those rows, run once per seed (the data stays the same; the prefix, "
        "the head and the shuffling move); further draws are other samples of 800 + 200 rows, since which rows "
        f"a user happens to have moves the lead as much as the seed does. On fewer than "
        f"{SMALL_CLASSIFICATION_ROWS:,} rows a classifier's plain defaults train the prefix through the MLP; "
        "`--reparam none` trains it directly, as the defaults do on more. A clear win for the plain defaults: at "
        f"least {CLEAR_LEAD:g} points over the head-only baseline on average over the draws (the demo's bar), "
        "and ahead in every run. The prefix's lead: " + "; ".join(summary) + ".",
        "",
        markdown_table(["run", "draw", "seed", "validation accuracy", "test accuracy", "steps", "head only",
                        "TF-IDF", "lead over head only"], rows),  # fmt: skip
    ])


def _small_choice(r: dict) -> str:
    """The small set's reparameterisation on held-back validation rows, and whether the MLP earned the default."""
    from benchmarks.small_choice import RULE_POINTS

    runs = {(run["draw"], run["reparam"]): run for run in r["runs"]}
    rows = [[draw, reparam, f"{run['learning_rate']:g}", run["steps"], run["validation_accuracy"],
             run["held_back_accuracy"], run["head_only"], f"{100 * (run['held_back_accuracy'] - run['head_only']):+.1f}"]
            for (draw, reparam), run in sorted(runs.items())]  # fmt: skip
    draws = sorted({draw for draw, _ in runs})
    gains = {d: 100 * (runs[d, "mlp"]["held_back_accuracy"] - runs[d, "none"]["held_back_accuracy"])
             for d in draws if (d, "mlp") in runs and (d, "none") in runs}  # fmt: skip
    if not gains:
        return "No draw has both runs yet, so no choice is drawn.\n\n" + markdown_table(["draw"], [[d] for d in draws])
    mean = statistics.mean(gains.values())
    chosen = len(gains) == len(draws) and min(gains.values()) > 0 and mean >= RULE_POINTS
    held_back = next(iter(runs.values()))["held_back_rows"]
    return "\n".join([
        f"Each draw: {SMALL['train']} training rows of the small set, early stopping on {SMALL['validation']} "
        f"validation rows, then the prefix and the head-only baseline scored on the {held_back:,} validation rows "
        "held back; the test split is not written out. The rule, fixed before these runs: the MLP becomes the "
        f"small-data default only if it leads the direct prefix on every draw, by at least {RULE_POINTS:g} points "
        "on average. The MLP against the direct prefix: "
        + ", ".join(f"draw {d} {g:+.1f}" for d, g in gains.items())
        + f"; {mean:+.1f} points on average (the rule: {_mark(chosen)}).",
        "",
        markdown_table(["draw", "reparam", "lr", "steps", "validation accuracy (early stopping)",
                        "held-back accuracy", "head only", "lead over head only"], rows),  # fmt: skip
    ])


def _paired(runs: list[dict], label: str, other: str) -> str:
    """`label` against `other` on the draws and seeds both ran, on test: the choice between them, measured."""
    test = {(_small_label(r), r.get("draw", 0), r["seed"]): r["accuracy"] for r in runs}
    pairs = [(test[key], test[(other, *key[1:])]) for key in test if key[0] == label and (other, *key[1:]) in test]
    if not pairs:
        return f"{label} and {other} share no draw and seed"
    gaps = [100 * (a - b) for a, b in pairs]
    return (f"{label} against {other} on the same draw and seed: {statistics.mean(gaps):+.1f} points on average, "
            f"ahead in {sum(g > 0 for g in gaps)} of {len(gaps)} runs")  # fmt: skip


def _demo_settings(r: dict) -> str:
    """The demo's variants on validation, best first, and whether any should replace the demo's settings:
    first those run with bf16 autocast, then the float32 screen and its confirmation."""
    rows = [v for v in r["variants"] if v["precision"] == "auto"]
    float32 = [v for v in r["variants"] if v["precision"] == "float32"]
    return "\n\n".join([_demo_bf16(rows), *([_demo_float32(float32)] if float32 else [])])


def _demo_bf16(variants: list[dict]) -> str:
    """A lead smaller than a standard error of the validation accuracy is noise, and the demo's own work is
    already at its 3-minute limit on a 2-core machine without native bf16, so a variant replaces the demo's
    settings only when it leads by more than a standard error and takes no longer than the demo."""
    from benchmarks.demo_settings import settings

    rows = sorted(variants, key=lambda v: -v["validation_accuracy"])
    demo_settings = settings({})
    demo = next((v for v in rows if demo_settings.items() <= v.items()), None)
    if demo is None:
        return "The demo's own settings are not among the variants yet."
    n = VALIDATION_ROWS
    se = 100 * (demo["validation_accuracy"] * (1 - demo["validation_accuracy"]) / n) ** 0.5
    fits = [v for v in rows if v is not demo and v["demo_wall_s"] <= 1.05 * demo["demo_wall_s"]]

    def lead(v: dict) -> float:
        return 100 * (v["validation_accuracy"] - demo["validation_accuracy"])

    best_fit = max((lead(v) for v in fits), default=0.0)
    table = [["**the demo**" if v is demo else "", f"{v['train_samples']:,} x {v['epochs']}",
              f"{v['learning_rate']:g}", f"{v['top_layers']} of 6", v["steps"], v["validation_accuracy"],
              f"{lead(v):+.2f}", v["head_only_validation_accuracy"],
              round(v["demo_wall_s"])] for v in rows]  # fmt: skip
    return "\n".join([
        f"`prefixtune demo` on MiniLM with Rotten Tomatoes, each variant scored on the {n:,}-row validation split "
        "(the test split is never read here), with bf16 autocast (a CPU with native bf16). A variant would "
        f"replace the demo's settings if it led on validation by more than a standard error ({se:.1f} points) and "
        "took no longer than the demo, whose work is already at the 3-minute limit on a 2-core machine without "
        f"native bf16. The best lead among the variants that take no longer: {best_fit:+.2f} points (the demo's "
        f"settings hold: {_mark(best_fit <= se)}). Wall time is the whole demo run on 2 cores, validation scoring "
        "included.",
        "",
        markdown_table(["", "snippets x epochs", "lr", "prefix layers (top)", "steps", "validation accuracy",
                        "lead (points)", "head only", "wall (s)"], table),  # fmt: skip
    ])


def _demo_variant(v: dict) -> str:
    """A float32 variant as what it changes from the demo's settings."""
    from benchmarks.demo_settings import settings

    base = settings({"precision": "float32"})
    names = {"train_samples": "snippets", "learning_rate": "lr", "batch_size": "batch", "num_virtual_tokens": "P",
             "top_layers": "top layers"}  # fmt: skip
    changed = [f"{names.get(k, k)} {v[k]:g}" for k in names if v[k] != base[k]]
    if v["epochs"] != base["epochs"]:
        changed.append(f"{v['epochs']} epochs")
    if v["text"]:
        changed.append(f"init from the text “{v['text']}”")
    if v["head_init"] != "random":
        changed.append(f"head init {v['head_init']}")
    if v["dropout"] is not None:
        changed.append(f"dropout {v['dropout']:g} while training")
    return ", ".join(changed) or "**the demo's settings**"


def _demo_float32(rows: list[dict]) -> str:
    from benchmarks.demo_settings import (
        CONFIRM_SEEDS,
        FLOAT32_SCREEN,
        TIME_BOUND,
        all_seeds,
        find,
        float32_verdict,
        in_time,
    )

    screened = [row for v in FLOAT32_SCREEN if (row := find(rows, v)) is not None]
    screen = sorted(screened, key=lambda v: -v["validation_accuracy"])
    demo = next((v for v in screen if _demo_variant(v).startswith("**")), None)
    if demo is None:
        return "The float32 screen has not run the demo's own settings yet."
    table = [[_demo_variant(v), v["steps"], v["validation_accuracy"],
              f"{100 * (v['validation_accuracy'] - demo['validation_accuracy']):+.2f}",
              round(v["demo_wall_s"]), f"{v['demo_wall_s'] / demo['demo_wall_s']:.2f}",
              "yes" if in_time(v, demo) else "no"] for v in screen]  # fmt: skip
    parts = [
        "**In float32** (`precision=\"float32\"`: a CPU without native bf16, where the demo is slowest). The rule, "
        "fixed before these ran: a screen at the demo's seed 42; the demo and the two best variants in time run "
        f"again with seeds {', '.join(map(str, CONFIRM_SEEDS))}; a "
        "variant replaces the demo's settings only if its 3-seed mean leads the demo's by more than one standard "
        f"error of such a mean and it leads on every seed. In time: at most {TIME_BOUND:g} x the demo's wall, or "
        "only the learning rate changed (the demo's work exactly; a gate amended after the screen, when identical "
        "work had varied by 9% in wall time). A second round, after the first found nothing, ran two more variants "
        "on all three seeds under the same rule; one with more work is in time if its mean wall is within "
        f"{TIME_BOUND:g} x the median of the demo's. A third round, after the test split had shown the demo's "
        "expected accuracy near 0.77 (\"The demo over seeds\"), ran one more the same way: no dropout while "
        "training, on the idea that 376 steps underfit.",
        "",
        markdown_table(["variant (seed 42)", "steps", "validation accuracy", "lead (points)", "wall (s)",
                        "x the demo's wall", "in time"], table),  # fmt: skip
    ]
    verdict = float32_verdict(rows)
    if verdict is None:
        return "\n".join([*parts, "", "The confirmation runs are not all in yet."])
    confirm = [[_demo_variant({**c["runs"][0]}), *(run["validation_accuracy"] for run in c["runs"]),
                f"{c['mean']:.4f}", f"{c.get('lead', 0.0):+.2f}",
                "—" if "passes" not in c else ("yes" if c["leads_every_seed"] else "no"),
                "—" if "passes" not in c else ("yes" if c["in_time"] else "no"),
                round(statistics.mean(run["demo_wall_s"] for run in c["runs"]))]
               for c in [verdict["demo"], *verdict["candidates"]]]  # fmt: skip
    winner = verdict["winner"]
    outcome = (f"{_demo_variant(winner['runs'][0])} replaces the demo's settings" if winner
               else "no variant passes: the demo's settings stay")  # fmt: skip
    return "\n".join([
        *parts, "",
        markdown_table(["variant", *(f"seed {s}" for s in all_seeds()), "mean", "lead (points)",
                        "ahead on every seed", "in time", "mean wall (s)"], confirm),  # fmt: skip
        "",
        f"One standard error of a 3-seed mean: {verdict['se']:.2f} points. Verdict: {outcome}.",
    ])


def _demo_seeds(r: dict) -> str:
    """`make demo` prints one seed's figures; the bars it is held to are read from that one draw, so the
    other seeds' figures go beside it. They choose nothing."""
    from benchmarks.demo_seeds import ACCURACY_BAR, summary
    from benchmarks.demo_settings import all_seeds

    rows = summary(r["runs"])
    if not rows:
        return "Not every seed has run yet."
    names = {"bf16": "bf16 autocast (`make demo` on a CPU with native bf16)", "float32": "float32 (a CPU without)"}
    table = [[names[s["precision"]],
              *(f"{run['prefix_accuracy']:.4f} ({run['head_only_accuracy']:.4f})" for run in s["runs"]),
              f"{s['mean']:.4f}", f"{s['spread']:.1f}", ", ".join(f"{lead:+.1f}" for lead in s["leads"]),
              round(statistics.mean(run["demo_wall_s"] for run in s["runs"]))] for s in rows]  # fmt: skip
    lines = [
        "`prefixtune demo` as it ships, but for the seed (which picks its 3,000 training snippets, the prefix's "
        f"start and the head's) and the precision, scored on the test split. The demo prints seed {all_seeds()[0]}. "
        "In each cell the prefix's test accuracy, and in brackets the head-only baseline's on the same snippets. "
        "The settings were fixed on validation before these ran; no setting reads them.",
        "",
        markdown_table(["precision", *(f"seed {s}" for s in all_seeds()), "mean", "spread (points)",
                        "lead over head only (points)", "mean wall (s)"], table),  # fmt: skip
        "",
    ]
    for s in rows:
        reached = sum(run["prefix_accuracy"] >= ACCURACY_BAR for run in s["runs"])
        lines.append(
            f"- {s['precision']}: the demo's seed gives {s['runs'][0]['prefix_accuracy']:.4f}, the {len(s['runs'])} "
            f"seeds {s['mean']:.4f} on average; {reached} of {len(s['runs'])} reach {ACCURACY_BAR:g}. The lead over "
            f"head only is at least {s['min_lead']:+.1f} points on every seed ({CLEAR_LEAD:g} or more on every "
            f"seed: {_mark(s['min_lead'] >= CLEAR_LEAD)})."
        )
    return "\n".join(lines)


def _gpu(r: dict) -> str:
    from benchmarks.gpu import section

    return section(r)


def _chat(r: dict) -> str:
    from benchmarks.chat import section

    return section(r)


SECTIONS: list[tuple[str, str, Any]] = [
    ("speed", "Speed and memory against PEFT and the frozen model", _speed),
    ("classification", "Classification quality", _classification),
    ("generation", "Generation quality", _generation),
    ("serving", "Many prefixes on one model", _serving),
    ("scaling", "Scaling with prefix and sequence length", _scaling),
    ("defaults", "Defaults, search and baselines", _defaults),
    ("small_choice", "The small set's reparameterisation, chosen on validation", _small_choice),
    ("demo_settings", "The demo's settings", _demo_settings),
    ("demo_seeds", "The demo over seeds, on the test split", _demo_seeds),
    ("chat", "Chat data: a headline prefix served through the chat endpoint", _chat),
    ("gpu", "On a GPU", _gpu),
]


def write(path: Path, quick: bool = False) -> None:
    machine = json.loads((RESULTS / "machine.json").read_text()) if (RESULTS / "machine.json").exists() else {}
    timings_path = RESULTS / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    lines = ["# Benchmarks", "",
             f"Made by `python -m benchmarks.run{' --quick' if quick else ''}` "
             f"(`make bench{'-quick' if quick else ''}`). Machine: "
             + ", ".join(f"{k} {v}" for k, v in machine.items()) + ". Every figure below was measured by that "
             "command on this machine; results are in `benchmarks/results/`.", "",
             "Seeds: every random choice is seeded. Data shuffles, prefix initialisation and new heads use the "
             "row's `--seed` (0 unless a table lists seeds); the speed, scaling and serving inputs are random "
             "token ids drawn under fixed torch seeds (0 and 1). Decoding is greedy everywhere.", ""]  # fmt: skip
    for name, title, render in SECTIONS:
        result = _load(name, quick)
        lines += [f"## {title}", ""]
        if result is None:
            lines += ["Not run yet.", ""]
            continue
        seconds = timings.get(name + ("-quick" if quick else ""))
        lines += [f"Command: `python -m benchmarks.{name}{' --quick' if quick else ''}`"
                  + (f" (group wall time {seconds / 60:.1f} min)." if seconds else "."), "", render(result), ""]  # fmt: skip
        if result.get("note"):  # written by hand into the results file: how the run went, never a figure
            lines += [f"Note on this run: {result['note']}", ""]
    path.write_text("\n".join(lines))
