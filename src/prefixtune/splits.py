"""Seeded train/validation/test splits, by row or by group, and the validation carve-out.

A model chosen on validation is only honest when no row, and no group of related rows (the
snippets of one movie, the turns of one conversation), sits in two splits. Every split here is a
pure function of the rows and a seed, so a run can be repeated and audited.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from prefixtune.errors import PrefixTuneError

HOLD_OUT_FRACTION = 0.1  # the share of the training rows held out when no validation data is given
MIN_HELD_OUT = 1


def _check_fracs(val_frac: float, test_frac: float) -> None:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise PrefixTuneError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum to less than 1")


def split_rows(rows: Sequence[dict], seed: int, val_frac: float, test_frac: float) -> dict[str, list[dict]]:
    """Seeded row-level split; shuffles a copy so the caller's order is untouched."""
    _check_fracs(val_frac, test_frac)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = round(len(rows) * test_frac)
    n_val = round(len(rows) * val_frac)
    test = [rows[i] for i in order[:n_test]]
    val = [rows[i] for i in order[n_test : n_test + n_val]]
    train = [rows[i] for i in order[n_test + n_val :]]
    return {"train": train, "validation": val, "test": test}


def split_grouped(
    rows: Sequence[dict], groups: Sequence[str], seed: int, val_frac: float, test_frac: float
) -> dict[str, list[dict]]:
    """Seeded split where every group lands in exactly one split.

    Review snippets of the same movie share names and plot words; letting a movie span train and
    test would leak and inflate accuracy.
    """
    _check_fracs(val_frac, test_frac)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    names = sorted(by_group)
    random.Random(seed).shuffle(names)
    n = len(rows)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    quota = {"test": test_frac * n, "validation": val_frac * n}
    for name in names:
        idx = by_group[name]
        for split in ("test", "validation"):
            if len(splits[split]) < quota[split]:
                break
        else:
            split = "train"
        splits[split].extend(rows[i] for i in idx)
    return splits


def hold_out(
    rows: Sequence[dict], seed: int, fraction: float = HOLD_OUT_FRACTION, group_key: str | None = None
) -> tuple[list[dict], list[dict]]:
    """`(train, validation)`: a seeded `fraction` of `rows` held out, whole groups at a time when `group_key` is set.

    Both parts must be non-empty: early stopping and the keep-the-best rule need something to score.
    """
    if not 0 < fraction < 1:
        raise PrefixTuneError(f"the validation fraction must be in (0, 1), got {fraction!r}")
    if group_key is None:
        parts = split_rows(rows, seed, fraction, 0.0)
    else:
        missing = next((i for i, r in enumerate(rows) if group_key not in r), None)
        if missing is not None:
            raise PrefixTuneError(f"training row {missing} has no group value ({group_key!r})")
        parts = split_grouped(rows, [str(r[group_key]) for r in rows], seed, fraction, 0.0)
    if len(parts["validation"]) < MIN_HELD_OUT or not parts["train"]:
        what = f"{len(rows)} rows" + (f" in {len({str(r[group_key]) for r in rows})} groups" if group_key else "")
        raise PrefixTuneError(
            f"cannot hold out a validation part of {fraction:.0%} from {what}; give --validation-file or more rows"
        )
    return parts["train"], parts["validation"]
