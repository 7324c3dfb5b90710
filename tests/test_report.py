"""The benchmark report: which figure each target is judged on, from hand-made results."""

from __future__ import annotations

import pytest


def _row(label: str, seeds: list[list[float]]) -> dict:
    runs = [{"seed": i, "validation_rougeL": 0.1, "rougeL": sum(s) / len(s), "rougeL_per_article": s, "wall_s": 1.0}
            for i, s in enumerate(seeds)]  # fmt: skip
    return {"label": label, **runs[0], "rouge1": 0.0, "rouge2": 0.0, "bleu": 0.0, "trainable": 1, "steps": 1,
            "lr": 0.1, "reparam": None, "train_s": 1.0, "train_size": 8, "test_size": len(seeds[0]),
            "validation_size": 2, "prefix_length": 16, "validation": [], "seeds": runs}  # fmt: skip


def test_seed_ratio_averages_each_article_over_seeds_before_pairing():
    from benchmarks.report import _seed_ratio

    prefix = _row("p", [[0.2, 0.4], [0.4, 0.0]])["seeds"]  # per-article means 0.3, 0.2
    full = _row("f", [[0.6, 0.2], [0.6, 0.6]])["seeds"]  # per-article means 0.6, 0.4: every article 0.5 ×
    mean, low, high = _seed_ratio(prefix, full)
    assert mean == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)


def test_generation_target_is_judged_on_the_seed_mean_not_seed_zero():
    from benchmarks.report import _generation

    rows = {"zero-shot": {**_row("zero", [[0.01, 0.01]]), "lr": None},
            "prefix": _row("prefix", [[0.30, 0.30], [0.20, 0.20], [0.20, 0.20]]),  # seed 0 ahead, then behind
            "full": _row("full", [[0.30, 0.30], [0.30, 0.30], [0.30, 0.30]])}  # fmt: skip
    text = _generation({"rows": rows})
    seed_zero = next(line for line in text.splitlines() if line.startswith("| prefix ROUGE-L"))
    mean = next(line for line in text.splitlines() if line.startswith("| the same, mean over seeds 0, 1, 2"))
    assert "1.00 ×" in seed_zero and "seed 0 only" in seed_zero
    assert "0.78 ×" in mean and "not met" in mean
    assert "1.00 / 0.67 / 0.67 ×" in text


def _cls_run(row: str, epochs: int, best: int, validation: float, test: float) -> dict:
    return {"row": row, "lr": 0.1 if row == "prefix" else 5e-5, "prefix_length": 16, "reparam_hidden": 512,
            "epochs": epochs, "best_epoch": best, "validation_accuracy": validation, "accuracy": test,
            "percent": 0.3 if row == "prefix" else 100.0, "wall_s": 60.0}  # fmt: skip


def test_long_schedule_compares_each_row_with_its_own_short_run():
    from benchmarks.report import _long_sweep

    long = {"prefix": _cls_run("prefix", 15, 12, 0.84, 0.79), "full": _cls_run("full", 15, 3, 0.85, 0.82)}
    other = {**_cls_run("prefix", 6, 4, 0.82, 0.77), "lr": 0.03}  # a sweep run of another setting: not the match
    swept = {"runs": [other, _cls_run("prefix", 6, 5, 0.83, 0.78)], "long": {"epochs": 15, "train_size": 4000,
                                                                            "runs": long}}  # fmt: skip
    rows = {"full": {"label": "full fine-tuning", "full": _cls_run("full", 6, 5, 0.847, 0.825)}}
    text = _long_sweep(swept, rows)
    assert "| prefix, P = 16, direct | 0.1 | 6 → 15 | 5 → 12 | 0.8300 → 0.8400 | 0.7800 → 0.7900 |" in text
    assert "ahead on validation by +1.0 points with 15 epochs (+1.7 with 6), on test by +3.0 (+4.5)" in text
