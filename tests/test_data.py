"""read_table error messages, label encoding, budgeted tokenization and collation."""

import json
import warnings

import pytest
import tiny
import torch

from prefixtune.data import (
    IGNORE_INDEX,
    TruncationWarning,
    collate,
    encode_labels,
    load_hub_dataset,
    read_table,
    to_examples,
    tokenize_with_budget,
)
from prefixtune.errors import PrefixTuneError

# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per word, an eos and a pad token: lengths can be checked by counting words."""
    return tiny.tokenizer("decoder", list("abcdefghij") + "the cat sat on mat good bad".split())


def word_ids(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids(text.split())


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from prefixtune.assets import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return str(p)


# ---------------------------------------------------------------------------------- read_table


def test_read_csv_json_jsonl(tmp_path):
    rows = [{"text": "good film", "label": "pos"}, {"text": 'bad, "really"', "label": "neg"}]
    csv_path = write(tmp_path, "d.csv", 'text,label,extra\ngood film,pos,x\n"bad, ""really""",neg,y\n')
    json_path = write(tmp_path, "d.json", json.dumps(rows))
    jsonl_path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    for path in (csv_path, json_path, jsonl_path):
        assert read_table(path) == rows


def test_read_table_renames_columns(tmp_path):
    path = write(tmp_path, "d.jsonl", json.dumps({"article": "a b", "title": "c", "y": 3}) + "\n")
    assert read_table(path, text_column="article", label_column=None, target_column="title") == [
        {"text": "a b", "target": "c"}
    ]
    assert read_table(path, text_column="article", label_column="y") == [{"text": "a b", "label": 3}]


def test_read_table_missing_file(tmp_path):
    path = str(tmp_path / "nope.csv")
    with pytest.raises(PrefixTuneError, match="nope.csv: file not found"):
        read_table(path)


def test_read_table_unknown_extension(tmp_path):
    with pytest.raises(PrefixTuneError, match="unsupported file type '.txt'"):
        read_table(write(tmp_path, "d.txt", "hello"))


def test_read_table_missing_column_lists_present(tmp_path):
    path = write(tmp_path, "d.csv", "sentence,label\nhi,1\n")
    with pytest.raises(PrefixTuneError, match=r"d.csv: column 'text' not found; columns present: sentence, label"):
        read_table(path)
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "lbl": 0}\n')
    with pytest.raises(PrefixTuneError, match=r"line 2 has no column 'label'; columns present: text, lbl"):
        read_table(path)


@pytest.mark.parametrize(
    ("name", "content"), [("e.csv", ""), ("h.csv", "text,label\n"), ("e.json", "[]"), ("e.jsonl", "\n\n")]
)
def test_read_table_empty(tmp_path, name, content):
    with pytest.raises(PrefixTuneError, match=rf"{name}: the (file|data set) is empty"):
        read_table(write(tmp_path, name, content))


def test_read_table_non_utf8(tmp_path):
    path = write(tmp_path, "d.csv", b"text,label\ncaf\xc3\xa9,1\nna\xefve,0\n")
    with pytest.raises(PrefixTuneError, match=r"d.csv: not valid UTF-8 at line 3 \(byte offset 21\)"):
        read_table(path)


def test_read_table_utf8_bom(tmp_path):
    path = write(tmp_path, "d.csv", "\ufefftext,label\nhi,1\n".encode())
    assert read_table(path) == [{"text": "hi", "label": "1"}]
    path = write(tmp_path, "b.csv", b"\xef\xbb\xbftext\n\xff\n")
    with pytest.raises(PrefixTuneError, match=r"line 2 \(byte offset 8\)"):
        read_table(path)


def test_read_table_malformed_json(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 0}\n]')
    with pytest.raises(PrefixTuneError, match=r"d.json: malformed JSON at line 3"):
        read_table(path)
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(PrefixTuneError, match=r"d.jsonl: malformed JSON on line 2"):
        read_table(path)
    with pytest.raises(PrefixTuneError, match="expected a JSON list of objects"):
        read_table(write(tmp_path, "o.json", '{"text": "a"}'))
    with pytest.raises(PrefixTuneError, match="item 1 is a str"):
        read_table(write(tmp_path, "s.json", '[{"text": "a", "label": 1}, "b"]'))


def test_read_table_wrong_types(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n{"text": 42, "label": 0}\n')
    with pytest.raises(PrefixTuneError, match=r"line 2: column 'text' must be a string, got int 42"):
        read_table(path)
    path = write(tmp_path, "d.json", '[{"text": "a", "label": [1]}]')
    with pytest.raises(PrefixTuneError, match=r"item 0: label column 'label' must be an int or a string"):
        read_table(path)
    path = write(tmp_path, "n.json", '[{"text": null, "label": 1}]')
    with pytest.raises(PrefixTuneError, match="must be a string, got NoneType"):
        read_table(path)


def test_read_table_ragged_csv(tmp_path):
    with pytest.raises(PrefixTuneError, match="line 3 has fewer fields"):
        read_table(write(tmp_path, "d.csv", "text,label\na,1\nb\n"))
    with pytest.raises(PrefixTuneError, match="line 2 has more fields"):
        read_table(write(tmp_path, "d.csv", "text,label\na,1,2\n"))


def test_errors_are_one_line(tmp_path):
    with pytest.raises(PrefixTuneError) as info:
        read_table(write(tmp_path, "d.csv", b"text,label\n\xff,1\n"))
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------- encode_labels


def test_encode_labels_strings_sorted():
    rows = [{"label": "pos"}, {"label": "neg"}, {"label": "pos"}]
    assert encode_labels(rows, None) == ([1, 0, 1], ["neg", "pos"])


def test_encode_labels_ints_and_digit_strings():
    assert encode_labels([{"label": 2}, {"label": 0}], None) == ([2, 0], ["0", "1", "2"])
    assert encode_labels([{"label": "1"}, {"label": "0"}], None) == ([1, 0], ["0", "1"])


def test_encode_labels_given_names():
    names = ["negative", "positive"]
    rows = [{"label": "positive"}, {"label": 0}, {"label": "1"}]
    assert encode_labels(rows, names) == ([1, 0, 1], names)


def test_encode_labels_unknown_label():
    with pytest.raises(PrefixTuneError, match=r"unknown label 'postive'; known labels: 'negative', 'positive'"):
        encode_labels([{"label": "postive"}], ["negative", "positive"])
    with pytest.raises(PrefixTuneError, match="unknown label 5"):
        encode_labels([{"label": 5}], ["negative", "positive"])
    with pytest.raises(PrefixTuneError, match="label must be an int or a string"):
        encode_labels([{"text": "no label"}], None)


# ----------------------------------------------------------------------------------------- hub


def test_load_hub_dataset_offline_is_clear(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(PrefixTuneError, match="could not load hub data set 'no-such-user/no-such-data'") as info:
        load_hub_dataset("no-such-user/no-such-data")
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------- tokenization


def test_budget_too_small(word_tokenizer, bert_tokenizer):
    with pytest.raises(PrefixTuneError, match="leaves no room"):
        tokenize_with_budget(word_tokenizer, ["a b"], max_length=10, prefix_tokens=10)
    with pytest.raises(PrefixTuneError, match="special tokens"):  # [CLS] and [SEP] need 2 of the 2
        tokenize_with_budget(bert_tokenizer, ["a b"], max_length=12, prefix_tokens=10)


def test_classification_truncation_warns_once_with_count(bert_tokenizer):
    texts = ["short one", "this sentence is much too long to fit " * 3, "tiny", "another very long " * 5]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = tokenize_with_budget(bert_tokenizer, texts, max_length=16, prefix_tokens=6, labels=[0, 1, 0, 1])
    ours = [w for w in caught if issubclass(w.category, TruncationWarning)]
    assert len(ours) == 1
    assert "2 of 4 rows were truncated to 10 tokens" in str(ours[0].message)
    assert [len(x) for x in enc["input_ids"]][1] == 10 and max(map(len, enc["input_ids"])) == 10
    for ids in enc["input_ids"]:  # special tokens survive truncation
        assert ids[0] == bert_tokenizer.cls_token_id and ids[-1] == bert_tokenizer.sep_token_id
    assert enc["labels"] == [0, 1, 0, 1]
    assert "token_type_ids" in enc and [len(x) for x in enc["token_type_ids"]] == [len(x) for x in enc["input_ids"]]


def test_no_warning_when_everything_fits(word_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = tokenize_with_budget(word_tokenizer, ["a b c", "d"], max_length=8, prefix_tokens=4)
    assert enc["input_ids"] == [word_ids(word_tokenizer, "a b c"), word_ids(word_tokenizer, "d")]


def test_causal_lm_masks_prompt_and_padding(word_tokenizer):
    tok = word_tokenizer
    enc = tokenize_with_budget(
        tok,
        ["the cat sat", "a"],
        max_length=20,
        prefix_tokens=4,
        targets=["good", "bad bad"],
        mode="causal_lm",
    )
    eos = tok.eos_token_id
    good, bad, the, cat, sat, a = (tok.convert_tokens_to_ids(w) for w in ["good", "bad", "the", "cat", "sat", "a"])
    assert enc["input_ids"] == [[the, cat, sat, good, eos], [a, bad, bad, eos]]
    assert enc["labels"] == [[-100, -100, -100, good, eos], [-100, bad, bad, eos]]
    assert enc["attention_mask"] == [[1] * 5, [1] * 4]
    batch = collate(to_examples(enc), tok.pad_token_id)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[the, cat, sat, good, eos], [a, bad, bad, eos, pad]]
    assert batch["labels"].tolist() == [[-100, -100, -100, good, eos], [-100, bad, bad, eos, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    left = collate(to_examples(enc), pad, padding_side="left")
    assert left["input_ids"][1].tolist() == [pad, a, bad, bad, eos]
    assert left["labels"][1].tolist() == [-100, -100, bad, bad, eos]
    assert left["attention_mask"][1].tolist() == [0, 1, 1, 1, 1]


def test_causal_lm_truncates_prompt_from_left(word_tokenizer):
    tok = word_tokenizer
    with pytest.warns(TruncationWarning, match="1 of 2 rows were truncated to 5 tokens"):
        enc = tokenize_with_budget(
            tok,
            ["a b c d e f", "a"],
            max_length=8,
            prefix_tokens=3,
            targets=["good", "bad"],
            mode="causal_lm",
        )
    ids = tok.convert_tokens_to_ids
    assert enc["input_ids"][0] == [*ids(["d", "e", "f", "good"]), tok.eos_token_id]
    assert enc["labels"][0] == [-100, -100, -100, ids("good"), tok.eos_token_id]
    # a target longer than the budget loses its end, the whole prompt goes first
    with pytest.warns(TruncationWarning, match="1 of 1 rows"):
        enc = tokenize_with_budget(tok, ["a b"], max_length=5, prefix_tokens=2, targets=["g h i j"], mode="causal_lm")
    assert enc["input_ids"] == [ids(["g", "h", "i"])] and enc["labels"] == enc["input_ids"]


def test_causal_lm_without_targets_is_plain_lm(word_tokenizer):
    enc = tokenize_with_budget(word_tokenizer, ["a b c"], max_length=8, prefix_tokens=2, mode="causal_lm")
    assert enc["labels"] == enc["input_ids"] == [word_ids(word_tokenizer, "a b c")]


def test_seq2seq_labels(word_tokenizer):
    tok = word_tokenizer
    with pytest.warns(TruncationWarning) as record:
        enc = tokenize_with_budget(
            tok,
            ["a b c d e f g", "a"],
            max_length=6,
            prefix_tokens=2,
            targets=["good", "g h i j a b"],
            mode="seq2seq",
            max_target_length=3,
        )
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "1 of 2 rows were truncated to 3 tokens (max_length 6 - 2 prefix tokens) on the target side",
        "1 of 2 rows were truncated to 4 tokens (max_length 6 - 2 prefix tokens)",
    ]
    assert enc["input_ids"] == [word_ids(tok, "a b c d"), word_ids(tok, "a")]
    assert enc["labels"] == [[tok.convert_tokens_to_ids("good")], tok.convert_tokens_to_ids(["g", "h", "i"])]
    batch = collate(to_examples(enc), tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 4) and batch["labels"].shape == (2, 3)
    assert batch["labels"][0].tolist()[1:] == [IGNORE_INDEX, IGNORE_INDEX]


def test_collate_scalar_labels_and_errors(bert_tokenizer):
    enc = tokenize_with_budget(
        bert_tokenizer, ["good", "a bit longer text"], max_length=32, prefix_tokens=4, labels=[1, 0]
    )
    batch = collate(to_examples(enc), bert_tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape
    with pytest.raises(PrefixTuneError, match="no pad token"):
        collate(to_examples(enc), None)
    with pytest.raises(PrefixTuneError, match="padding_side"):
        collate(to_examples(enc), 0, padding_side="middle")


def test_tokenize_rejects_bad_input(word_tokenizer):
    with pytest.raises(PrefixTuneError, match="text 1 must be a string"):
        tokenize_with_budget(word_tokenizer, ["a", None], max_length=8, prefix_tokens=2)
    with pytest.raises(PrefixTuneError, match="2 texts but 1 targets"):
        tokenize_with_budget(word_tokenizer, ["a", "b"], 8, 2, targets=["a"], mode="causal_lm")
    with pytest.raises(PrefixTuneError, match="unknown mode"):
        tokenize_with_budget(word_tokenizer, ["a"], 8, 2, mode="mlm")
