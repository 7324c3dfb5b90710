"""The CLI's data: a bundled, hub or file data set as splits of rows, each option naming a column or a cap.

Every verb that reads data goes through `load_data`; training also holds out validation rows when
none were given (`load_training_data`), and says so.
"""

from __future__ import annotations

import sys

from prefixtune.errors import PrefixTuneError


def _limit(rows: list[dict], n: int | None) -> list[dict]:
    return rows[:n] if n else rows


FORMAT_NOTES = {
    "messages": "messages (rendered with the tokenizer's chat template; loss on assistant turns only)",
    "prompt_completion": "conversational prompt/completion (the chat template; loss on the completion only)",
    "text_pair": "prompt/completion text (no template; loss on the completion only)",
}


def data_format(record: dict, opts: dict) -> str:
    """The format of a data set, from its first record's columns (TRL's names), unless columns were named."""
    from prefixtune import chat

    found = chat.record_format(record)
    named = opts.get("text_column") not in (None, "text") or opts.get("target_column") is not None
    return "text" if named and found == "text_pair" else found


def _conversation_rows(records: list[tuple[str, dict]], kind: str) -> list[dict]:
    from prefixtune import chat

    if kind == "text_pair":
        return [{"text": str(rec["prompt"]), "target": str(rec["completion"])} for _, rec in records]
    return [chat.to_row(rec, where) for where, rec in records]


Records = tuple[list[tuple[str, dict]], list[str] | None]  # what `read_records` gives: (where, record) pairs, header


def _file_rows(path: str, read: Records, opts: dict, generation: bool) -> list[dict]:
    """One file's rows, from its records as `read_records` read them."""
    from prefixtune.data import table_rows

    records, header = read
    kind = data_format(records[0][1], opts)
    if kind != "text":
        return _conversation_rows([(f"{path}: {w}", r) for w, r in records], kind)
    label = None if generation else opts["label_column"]
    target = opts["target_column"] if generation else None
    return table_rows(path, records, header, opts["text_column"], label, target, opts.get("group_column"))


def _hub_rows(raw: dict[str, list[dict]], opts: dict, generation: bool) -> dict[str, list[dict]]:
    kind = opts.get("data_format", "text")
    if kind != "text":
        return {("validation" if split in ("validation", "valid", "dev") else split): _conversation_rows(
            [(f"hub data set {opts['hub_dataset']!r} split {split!r} row {i}", r) for i, r in enumerate(records)], kind)
            for split, records in raw.items()}  # fmt: skip
    wanted = {"text": opts["text_column"]}
    wanted.update({"target": opts["target_column"]} if generation else {"label": opts["label_column"]})
    if opts.get("group_column"):
        wanted["group"] = opts["group_column"]
    splits = {}
    for split, records in raw.items():
        rows = []
        for i, rec in enumerate(records):
            missing = [c for c in wanted.values() if c not in rec]
            if missing:
                raise PrefixTuneError(
                    f"hub data set {opts['hub_dataset']!r} split {split!r} row {i} has no column(s) {missing}; "
                    f"columns present: {', '.join(rec)}"
                )
            rows.append({k: rec[c] for k, c in wanted.items()})
        splits["validation" if split in ("validation", "valid", "dev") else split] = rows
    return splits


def load_data(opts: dict, label_names: list[str] | None = None) -> tuple[dict[str, list[dict]], list[str] | None]:
    """`({split: rows}, label_names)` from a bundled data set, local files or the hub; labels as indices."""
    from prefixtune import chat
    from prefixtune.assets import load_builtin_dataset
    from prefixtune.data import encode_labels, load_hub_dataset, read_records

    sources = [k for k in ("dataset", "hub_dataset") if opts.get(k)]
    files = {s: opts.get(f"{s}_file") for s in ("train", "validation", "test") if opts.get(f"{s}_file")}
    if len(sources) + bool(files) != 1:
        raise PrefixTuneError("give exactly one data source: --dataset, --hub-dataset, or --train-file/--test-file")
    if opts.get("dataset"):  # bundled rows are already in their canonical form
        ds = load_builtin_dataset(opts["dataset"], seed=opts.get("data_seed") or 0)
        opts["data_format"] = chat.record_format(next(iter(ds.splits.values()))[0])
    elif opts.get("hub_dataset"):
        raw = load_hub_dataset(opts["hub_dataset"], opts["hub_config"])
        first = next(iter(raw.values()))
        opts["data_format"] = data_format(first[0], opts) if first else "text"
    else:
        read = {s: read_records(p) for s, p in files.items()}
        opts["data_format"] = data_format(next(iter(read.values()))[0][0][1], opts)
    if opts["data_format"] != "text":
        print(f"note: data format: {FORMAT_NOTES[opts['data_format']]}", file=sys.stderr)
    generation = (
        opts.get("target_column") is not None
        or opts.get("task") in ("causal_lm", "seq2seq_lm")
        or opts["data_format"] != "text"
    )
    if opts.get("dataset"):
        splits = {k: list(v) for k, v in ds.splits.items()}
        names = ds.label_names
        if label_names is not None and names is not None and list(label_names) != list(names):
            raise PrefixTuneError(f"the prefix was trained on labels {label_names}, {opts['dataset']} has {names}")
    else:
        if generation and opts.get("target_column") is None and opts["data_format"] == "text":
            raise PrefixTuneError("generation data needs --target-column (the column holding the target text)")
        if opts.get("hub_dataset"):
            splits = _hub_rows(raw, opts, generation)
        else:
            splits = {s: _file_rows(files[s], read[s], opts, generation) for s in files}
        names = label_names
        if not generation:
            first = splits.get("train") or next(iter(splits.values()))
            _, names = encode_labels(first, label_names)
            for rows in splits.values():
                indices, _ = encode_labels(rows, names)
                for row, k in zip(rows, indices, strict=True):
                    row["label"] = k
    limit_train, limit_eval = opts.get("max_train_samples"), opts.get("max_eval_samples")
    splits = {s: _limit(rows, limit_train if s == "train" else limit_eval) for s, rows in splits.items()}
    for split, rows in splits.items():
        if not rows:
            raise PrefixTuneError(f"the {split} split is empty (no rows)")
    return splits, names


def load_training_data(opts: dict) -> tuple[dict[str, list[dict]], list[str] | None]:
    """`load_data`, plus a seeded validation part held out of the training rows when none was given."""
    from prefixtune.splits import hold_out

    splits, label_names = load_data(opts)
    if "train" not in splits:
        raise PrefixTuneError("no training data: give --train-file, or a --dataset/--hub-dataset with a train split")
    if "validation" not in splits:
        group = "group" if opts.get("group_column") else None
        fraction, seed = opts["validation_fraction"], opts.get("data_seed") or 0
        splits["train"], splits["validation"] = hold_out(splits["train"], seed, fraction, group)
        grouped = f", whole {opts['group_column']!r} groups" if group else ""
        print(
            f"note: no validation data given; held out {len(splits['validation'])} of the training rows "
            f"({fraction:.0%}, seed {seed}{grouped}) to stop early and keep the best prefix",
            file=sys.stderr,
        )
    return splits, label_names


