"""Metrics checked against values worked out by hand."""

import math

import pytest

from prefixtune.errors import PrefixTuneError
from prefixtune.metrics import classification_metrics, generation_metrics, rouge_per_example


def test_classification_metrics_hand_computed():
    # class 0: F1 1; class 1: tp 1, fp 1, fn 0 -> 2/3; class 2: tp 1, fp 0, fn 1 -> 2/3
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_classification_metrics_constant_predictor():
    # always "1" on 3 ones and 1 zero: class 1 F1 = 2*3/(2*3+1) = 6/7, class 0 F1 = 0
    m = classification_metrics([1, 1, 1, 1], [1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx(3 / 7)


def test_classification_metrics_errors():
    with pytest.raises(PrefixTuneError, match="3 predictions but 2"):
        classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(PrefixTuneError, match="zero"):
        classification_metrics([], [])


def test_generation_metrics_hand_computed():
    preds = ["the cat sat on the mat", "hello world"]
    refs = ["the cat is on the mat", "hello there world"]
    m = generation_metrics(preds, refs)
    # rouge1: pair 1 P = R = 5/6; pair 2 P = 1, R = 2/3 -> F = 0.8
    assert m["rouge1"] == pytest.approx((5 / 6 + 0.8) / 2)
    # rouge2: pair 1 shares "the cat", "on the", "the mat" of 5 bigrams each -> 0.6; pair 2 -> 0
    assert m["rouge2"] == pytest.approx(0.3)
    # rougeL: LCS "the cat on the mat" (5) and "hello world" (2)
    assert m["rougeL"] == pytest.approx((5 / 6 + 0.8) / 2)
    assert set(m) == {"rouge1", "rouge2", "rougeL", "bleu"}


def test_rouge_per_example_averages_to_the_corpus_figure():
    preds = ["the cat sat on the mat", "hello world", "nothing alike"]
    refs = ["the cat is on the mat", "hello there world", "cats and dogs"]
    each = rouge_per_example(preds, refs)
    assert [round(e["rougeL"], 6) for e in each] == [round(5 / 6, 6), 0.8, 0.0]
    corpus = generation_metrics(preds, refs)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert sum(e[k] for e in each) / 3 == pytest.approx(corpus[k])


def test_generation_metrics_stemming():
    m = generation_metrics(["cats running"], ["cat runs"])
    assert m["rouge1"] == pytest.approx(1.0)


def test_bleu_hand_computed():
    # same length (BP = 1); n-gram precisions 4/5, 3/4, 2/3, 1/2
    m = generation_metrics(["a b c d e"], ["a b c d f"])
    assert m["bleu"] == pytest.approx(100 * math.exp(sum(map(math.log, [4 / 5, 3 / 4, 2 / 3, 1 / 2])) / 4))
    assert generation_metrics(["same words here ok"], ["same words here ok"])["bleu"] == pytest.approx(100)
    assert generation_metrics(["x y z w"], ["a b c d"])["bleu"] == pytest.approx(0)


def test_generation_metrics_length_mismatch():
    with pytest.raises(PrefixTuneError):
        generation_metrics(["a"], ["a", "b"])
