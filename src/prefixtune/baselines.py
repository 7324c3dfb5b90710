"""Cheap reference scores for a classification prefix: did the prefix earn its cost?

- `head_only`: the frozen model with only a freshly trained classification head. The backbone is
  frozen, so the vector the head reads is computed once per row and the head trains on the cache
  for many epochs: the baseline gets its best shot for the cost of one forward pass over the data.
- `tfidf`: word 1-2 gram TF-IDF + logistic regression, the classic bag-of-words reference.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from prefixtune import tasks
from prefixtune.core import attention
from prefixtune.errors import PrefixTuneError
from prefixtune.metrics import classification_metrics
from prefixtune.model import PrefixModel

SUPPORTED = "one head module (BERT, RoBERTa, decoder `score`, ...) or DistilBERT's pre_classifier + classifier"
C_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _labels(rows: Sequence[dict], what: str) -> list[int]:
    if not rows:
        raise PrefixTuneError(f"the {what} rows are empty: expected a list of {{'text': str, 'label': int}} rows")
    missing = [i for i, r in enumerate(rows) if "text" not in r or "label" not in r]
    if missing:
        raise PrefixTuneError(f"{what} row {missing[0]} has no 'text' or no 'label': expected {{'text', 'label'}}")
    try:
        return [int(r["label"]) for r in rows]
    except (TypeError, ValueError):
        raise PrefixTuneError(f"{what} labels must be class indices 0, 1, ...: map label names to ints first") from None


def _check_classes(labels: Sequence[int], model: PrefixModel) -> None:
    num_labels = model.config.num_labels
    bad = sorted({y for y in labels if not 0 <= y < num_labels})
    if bad:
        raise PrefixTuneError(f"labels {bad} are outside 0..{num_labels - 1}, the model head's {num_labels} classes")


def _check_model(model: Any) -> None:
    if not isinstance(model, PrefixModel) or model.task != "classification":
        got = f"a PrefixModel for task {model.task!r}" if isinstance(model, PrefixModel) else type(model).__name__
        raise PrefixTuneError(f"the head-only baseline needs a classification PrefixModel (from attach), got {got}")


def _stack(model: PrefixModel, modules: dict[str, nn.Module]) -> nn.Module:
    """Features -> logits through `modules` as the model applies them, with the dropout the model
    puts before its head (else the backbone's hidden_dropout_prob, else none)."""
    own = getattr(model.base_model, "dropout", None)
    p = own.p if isinstance(own, nn.Dropout) else getattr(model.config, "hidden_dropout_prob", None)
    dropout, names = nn.Dropout(float(p or 0.0)), sorted(modules)
    if names == ["classifier", "pre_classifier"]:  # DistilBERT: pre_classifier, ReLU, dropout, classifier
        return nn.Sequential(modules["pre_classifier"], nn.ReLU(), dropout, modules["classifier"])
    if len(names) != 1:
        raise PrefixTuneError(f"head-only baseline: cannot train heads {names} together; supported: {SUPPORTED}")
    head = modules[names[0]]
    return nn.Sequential(dropout, head) if isinstance(head, nn.Linear) else head


def _fresh(head: nn.Module, std: float, gen: torch.Generator) -> nn.Module:
    """An untrained float32 copy of `head` (a plain Linear for a Linear): weights from `gen`, biases zero."""
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    else:
        new = copy.deepcopy(head).float()
        new._forward_hooks.clear()  # a base model's head carries prefixtune's head-swap hook
    for m in new.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std, generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif m is not new and hasattr(m, "reset_parameters"):  # LayerNorm and the like
            m.reset_parameters()
    return new.requires_grad_(True)


def _reduce(x: torch.Tensor, head: nn.Module, input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Per-token head input [B, T, H] -> what decides the logits: the last non-padding token for a
    Linear `score` (decoders pool its logits there, by HF's rule) or position 0 (RoBERTa-style heads)."""
    if x.dim() == 2:
        return x
    if not isinstance(head, nn.Linear):
        return x[:, :1]
    if pad_id is None:
        return x[:, -1]
    last = (torch.arange(input_ids.shape[1], device=x.device) * (input_ids != pad_id)).argmax(-1)
    return x[torch.arange(len(x), device=x.device), last]


@torch.no_grad()
def head_features(
    model: PrefixModel,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    max_length: int = 128,
    batch_size: int = 64,
    template: str = "{text}",
    with_prefix: bool = False,
) -> torch.Tensor:
    """What `model`'s head reads for every row [N, ...]: from the bare model (prefix off, its pooling kept),
    or `with_prefix` through the model as it stands, prefix and its own head copy included.

    The backbone is frozen, so these vectors can be cached and a head trained on them for many epochs.
    A pre-hook on the (first) head module captures its input; the model's own logits are checked
    against the head applied to the cached vector, so a head that reads something else is refused.
    """
    _check_model(model)
    if not rows:
        raise PrefixTuneError("no rows to compute head features on: expected a list of {'text': str} rows")
    names = sorted(model.head_modules)
    modules = {n: (model.heads[n] if with_prefix else getattr(model.base_model, n)) for n in names}
    stack = _stack(model, modules).eval()
    hooked = modules["pre_classifier" if len(names) > 1 else names[0]]
    seen: list[torch.Tensor] = []
    hook = hooked.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0] if args else next(iter(kwargs.values()))), with_kwargs=True
    )
    # No prefix keys/values or head swap; only the mean pooling the prefix would use, if any.
    mean = [None] if model.prefix_config.pooling == "mean" else None
    state = attention.PrefixState(slots={}, mean_pool=mean)
    pad_id = model.config.get_text_config().pad_token_id
    examples = tasks.encode(model, tokenizer, rows, max_length, template, with_targets=False)
    device = tasks.device_of(model)
    feats: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    bare = contextlib.nullcontext() if with_prefix else _bare(model, state)
    try:
        with tasks.eval_mode(model), bare:
            for idx, batch in tasks.batches(examples, batch_size, tokenizer.pad_token_id):
                batch = tasks.to_device(batch, device)
                seen.clear()
                logits = model(**batch).logits.float()
                if not seen:
                    raise PrefixTuneError(f"head-only baseline: the head {names} was not called in the forward pass")
                x = _reduce(seen[0].float(), hooked, batch["input_ids"], pad_id)
                if not torch.allclose(stack(x.to(seen[0].dtype)).float(), logits, atol=1e-4, rtol=1e-3):
                    raise PrefixTuneError(
                        f"head-only baseline: the logits of {type(model.base_model).__name__} are not its head "
                        f"{names} applied to the vector it reads; supported: {SUPPORTED}"
                    )
                for i, row in zip(idx, x, strict=True):
                    feats[i] = row
    finally:
        hook.remove()
    return torch.stack(feats)


@contextlib.contextmanager
def _bare(model: PrefixModel, state: attention.PrefixState) -> Iterator[None]:
    with model.disable_prefix(), attention.activate(state):
        yield


def _fit(head: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, gen: torch.Generator) -> None:
    """Train `head` on cached vectors: AdamW, linear warmup schedule, batch 32, the head's own dropout
    (its masks from the global RNG, which the callers seed and restore), rows shuffled by `gen`."""
    from transformers import get_scheduler

    steps = epochs * -(-len(y) // 32)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(0.06 * steps), num_training_steps=steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            idx = idx.to(x.device)
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    head.eval()


def probe_head(
    model: PrefixModel,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    max_length: int = 128,
    template: str = "{text}",
    epochs: int = 20,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> float:
    """Train `model`'s own head alone, in place, on cached vectors of the model with its initial prefix:
    the linear-probe half of LP-FT (Kumar et al. 2022). Training the prefix then starts from a head that
    already separates the classes, instead of pushing gradients through a random one. Returns the
    probe's accuracy on `rows`."""
    _check_model(model)
    labels = _labels(rows, "training")
    _check_classes(labels, model)
    y = torch.tensor(labels)
    x = head_features(model, tokenizer, rows, max_length=max_length, template=template, with_prefix=True)
    head = _stack(model, {n: model.heads[n] for n in model.head_modules})
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        _fit(head, x, y.to(x.device), epochs, learning_rate, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((head(x).argmax(-1).cpu() == y).float().mean())


def head_only(
    model: PrefixModel,
    tokenizer: Any,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    *,
    max_length: int = 128,
    batch_size: int = 64,
    template: str = "{text}",
    epochs: int = 20,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy / macro-F1 of the frozen model with only a trained head: what the prefix must beat.

    The head reads exactly what it reads in `model` (its pooling mode included) but with the prefix
    off; a re-initialised copy of the head trains on cached vectors (AdamW, linear warmup schedule,
    batch 32, the model's dropout), outside the model: the model, its head and RNG are untouched.
    """
    _check_model(model)
    start = time.perf_counter()
    y_train, y_eval = _labels(train_rows, "training"), _labels(eval_rows, "evaluation")
    _check_classes(y_train + y_eval, model)
    options = dict(max_length=max_length, batch_size=batch_size, template=template)
    x_train = head_features(model, tokenizer, train_rows, **options)
    x_eval = head_features(model, tokenizer, eval_rows, **options)
    device, gen = x_train.device, torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    # The global RNG (default Linear init, dropout masks) is seeded inside and the caller's restored after.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        head = _stack(model, {n: _fresh(getattr(model.base_model, n), std, gen) for n in model.head_modules})
        _fit(head.to(device), x_train, torch.tensor(y_train, device=device), epochs, learning_rate, gen)
    with torch.no_grad():
        preds = head(x_eval).argmax(-1).tolist()
    metrics: dict[str, float] = classification_metrics(preds, y_eval)
    trainable = sum(p.numel() for p in head.parameters())
    metrics.update(trainable=trainable, seconds=time.perf_counter() - start, train_rows=len(y_train))
    return metrics


def _sklearn() -> tuple[Any, Any]:
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise PrefixTuneError("the tfidf baseline needs scikit-learn: pip install 'prefixtune[baselines]'") from None
    return TfidfVectorizer, LogisticRegression


def tfidf(
    train_rows: Sequence[dict], eval_rows: Sequence[dict], validation_rows: Sequence[dict] | None = None, seed: int = 0
) -> dict[str, float]:
    """Accuracy / macro-F1 of TF-IDF (word 1-2 grams, sublinear tf) + logistic regression.

    C is 1.0, or the best of a small grid on `validation_rows` when given: never tuned on `eval_rows`.
    Terms seen once are dropped from 1000 training rows on (noise there; on toy sets, all there is).
    """
    TfidfVectorizer, LogisticRegression = _sklearn()
    start = time.perf_counter()
    y_train, y_eval = _labels(train_rows, "training"), _labels(eval_rows, "evaluation")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if len(y_train) >= 1000 else 1)
    x_train = vectorizer.fit_transform([r["text"] for r in train_rows])

    def fit(c: float) -> Any:
        return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x_train, y_train)

    best = 1.0
    if validation_rows:
        y_val = _labels(validation_rows, "validation")
        x_val = vectorizer.transform([r["text"] for r in validation_rows])
        scores = {c: (fit(c).predict(x_val) == y_val).mean() for c in C_GRID}
        best = max(C_GRID, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    preds = fit(best).predict(vectorizer.transform([r["text"] for r in eval_rows])).tolist()
    metrics: dict[str, float] = classification_metrics(preds, y_eval)
    metrics.update(C=best, seconds=time.perf_counter() - start, train_rows=len(y_train))
    return metrics


BASELINES = ("head", "tfidf")


def check(kinds: Sequence[str]) -> None:
    """Refuse unknown names, and tfidf without scikit-learn, before a run spends its time training."""
    unknown = [k for k in kinds if k not in (*BASELINES, "none")]
    if unknown:
        raise PrefixTuneError(f"unknown baseline(s) {unknown}; expected any of {', '.join(BASELINES)}, or none")
    if "tfidf" in kinds:
        _sklearn()


def compare(
    model: PrefixModel,
    tokenizer: Any,
    kinds: Sequence[str],
    train_rows: Sequence[dict],
    score_rows: Sequence[dict],
    validation_rows: Sequence[dict] | None = None,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    template: str = "{text}",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """The baselines named in `kinds` ('head', 'tfidf'), each trained on `train_rows` and scored on `score_rows`."""
    check(kinds)
    out: dict[str, dict[str, float]] = {}
    if "head" in kinds:
        options = dict(max_length=max_length, batch_size=batch_size, template=template, seed=seed)
        out["head_only"] = head_only(model, tokenizer, train_rows, score_rows, **options)
    if "tfidf" in kinds:
        out["tfidf"] = tfidf(train_rows, score_rows, validation_rows, seed=seed)
    return out
