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
