"""Evaluation metrics that work offline.

``evaluate.load("rouge")`` downloads a script from the hub, so we call the libraries those
scripts wrap (rouge-score, sacrebleu) directly; accuracy and macro-F1 are a few lines.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import PrefixTuneError


def _check_lengths(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise PrefixTuneError(f"got {len(a)} {what} but {len(b)} references/labels")
    if not a:
        raise PrefixTuneError(f"cannot compute metrics on zero {what}")


def classification_metrics(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (unweighted mean of per-class F1 over classes seen in preds or labels).

    Macro-F1 is reported next to accuracy because the bundled data sets are imbalanced
    (Rotten Tomatoes is ~58% fresh), where a constant predictor still scores high accuracy.
    A class with no true and no predicted examples does not exist for this metric; a class with
    zero precision and recall counts as F1 = 0 (same as scikit-learn's default).
    """
    preds = [int(p) for p in preds]
    labels = [int(y) for y in labels]
    _check_lengths(preds, labels, "predictions")
    accuracy = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    f1s = []
    for c in sorted(set(preds) | set(labels)):
        tp = sum(p == c and y == c for p, y in zip(preds, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(preds, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(preds, labels, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L F-measure of each prediction (Porter stemming): what paired comparisons and bootstraps need."""
    from rouge_score import rouge_scorer

    predictions = list(predictions)
    references = list(references)
    _check_lengths(predictions, references, "predictions")
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    out = []
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # rouge_score's order is (target, prediction)
        out.append({k: scores[k].fmeasure for k in kinds})
    return out


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure in [0, 1] (Porter stemming) and sacrebleu corpus BLEU in [0, 100].

    The scales are those of the HF ``rouge`` and ``sacrebleu`` metrics, so numbers compare with
    what users get from ``evaluate`` elsewhere (multiply ROUGE by 100 for paper-style tables).
    """
    from sacrebleu import corpus_bleu

    per_example = rouge_per_example(predictions, references)
    out = {k: sum(s[k] for s in per_example) / len(per_example) for k in ("rouge1", "rouge2", "rougeL")}
    out["bleu"] = float(corpus_bleu(list(predictions), [list(references)]).score)
    return out
