"""The paired bootstrap that the generation benchmark reports beside its ratios."""

from __future__ import annotations

import random

import pytest

from benchmarks.common import paired_ratio_interval


def test_a_constant_ratio_has_no_spread():
    b = [random.Random(1).random() + 0.1 for _ in range(50)]
    low, high = paired_ratio_interval([2 * x for x in b], b)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)


def test_interval_holds_the_ratio_of_means_and_narrows_with_more_pairs():
    rng = random.Random(0)

    def sample(n: int) -> tuple[list[float], list[float]]:
        b = [rng.random() for _ in range(n)]
        return [x * 0.9 + rng.gauss(0, 0.1) for x in b], b

    a, b = sample(40)
    low, high = paired_ratio_interval(a, b)
    assert low < sum(a) / sum(b) < high
    wide = high - low
    a, b = sample(4000)
    low, high = paired_ratio_interval(a, b)
    assert low < 0.9 < high
    assert high - low < wide / 4


def test_unpaired_scores_are_refused():
    with pytest.raises(ValueError, match="paired"):
        paired_ratio_interval([1.0, 2.0], [1.0])


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
