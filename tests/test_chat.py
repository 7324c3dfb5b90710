"""Chat data in TRL's formats: detection, the assistant-only mask token by token, the CLI and serving the same way."""

from __future__ import annotations

import json

import pytest
import tiny
import torch

from prefixtune import attach, chat, cli, tasks
from prefixtune.data import IGNORE_INDEX
from prefixtune.errors import PrefixTuneError

WORDS = tiny.CHAT_WORDS + tiny.WORDS
CONVERSATION = [
    {"role": "system", "content": "the movie"},
    {"role": "user", "content": "say the title"},
    {"role": "assistant", "content": "great film"},
    {"role": "user", "content": "and the plot"},
    {"role": "assistant", "content": "bad plot"},
]


def chat_tokenizer():
    return tiny.tokenizer("decoder", WORDS, chat_template=tiny.CHAT_TEMPLATE)


def learnt(tok, row: dict) -> list[str]:
    example, _ = chat.encode_row(tok, row, budget=200)
    return [tok.convert_ids_to_tokens(t) for t, label in zip(example["input_ids"], example["labels"], strict=True)
            if label != IGNORE_INDEX]  # fmt: skip


def test_the_loss_covers_assistant_tokens_only_checked_token_by_token():
    tok = chat_tokenizer()
    example, cut = chat.encode_row(tok, {"messages": CONVERSATION}, budget=200)
    tokens = tok.convert_ids_to_tokens(example["input_ids"])
    assert not cut and tokens[:6] == ["system", ":", "the", "movie", "|", "user"]
    for label, token_id in zip(example["labels"], example["input_ids"], strict=True):
        assert label in (IGNORE_INDEX, token_id)
    # each assistant turn's words and its end-of-turn mark, nothing of the system or user turns or the roles
    assert learnt(tok, {"messages": CONVERSATION}) == ["great", "film", "|", "bad", "plot", "|"]
    marks = [label != IGNORE_INDEX for label in example["labels"]]
    assert marks == [tokens[i - 2 : i] == ["assistant", ":"] or (marks[i - 1] and tokens[i - 1] != "|")
                     for i in range(len(tokens))]  # fmt: skip


def test_a_conversational_completion_learns_only_the_completion():
    tok = chat_tokenizer()
    record = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    assert chat.record_format(record) == "prompt_completion"
    assert learnt(tok, chat.to_row(record, "row 0")) == ["bad", "plot", "|"]


def test_a_long_conversation_is_cut_from_the_left_and_keeps_its_last_answer():
    tok = chat_tokenizer()
    example, cut = chat.encode_row(tok, {"messages": CONVERSATION}, budget=8)
    assert cut and len(example["input_ids"]) == 8
    assert tok.convert_ids_to_tokens(example["input_ids"])[-3:] == ["bad", "plot", "|"]
    with pytest.raises(PrefixTuneError, match="keeps no assistant token within the 2-token input budget"):
        chat.encode_row(tok, {"messages": CONVERSATION[:3] + [{"role": "user", "content": "the end"}]}, budget=2)


@pytest.mark.parametrize(
    "record,message",
    [
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be \{'role'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\] must be"),
        ({"messages": "hello"}, "must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn to learn"),
    ],
)
def test_bad_conversations_are_named(record, message):
    with pytest.raises(PrefixTuneError, match=message):
        chat.to_row(record, "train.jsonl: line 3")


def test_a_tokenizer_without_a_chat_template_is_refused():
    with pytest.raises(PrefixTuneError, match="needs a tokenizer with a chat template"):
        chat.encode_row(tiny.tokenizer("decoder", WORDS), {"messages": CONVERSATION}, budget=50)


def test_formats_are_detected_from_the_columns():
    assert chat.record_format({"messages": []}) == "messages"
    assert chat.record_format({"prompt": [], "completion": []}) == "prompt_completion"
    assert chat.record_format({"prompt": "a", "completion": "b"}) == "text_pair"
    assert chat.record_format({"text": "a", "label": 1}) == "text"


@pytest.fixture
def chat_model_dir(tmp_path):
    tok = chat_tokenizer()
    model = tiny.make("llama", vocab_size=len(tok), pad_token_id=0, eos_token_id=3, bos_token_id=2,
                      initializer_range=0.2)  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _chat_file(path, n: int, seed: int = 0) -> str:
    rows = []
    for row in tiny.copy_rows(n, seed):  # "write the word hidden in the text" as conversations
        rows.append({"messages": [{"role": "user", "content": row["text"]},
                                  {"role": "assistant", "content": row["target"]}]})  # fmt: skip
    return tiny.write_jsonl(path, rows)


def test_the_cli_trains_on_chat_data_and_generates_through_the_same_template(tmp_path, chat_model_dir, capsys):
    out = tmp_path / "run"
    result = cli.train(model=str(chat_model_dir), train_file=_chat_file(tmp_path / "train.jsonl", 32),
                       validation_file=_chat_file(tmp_path / "val.jsonl", 8, seed=1), output_dir=str(out),
                       max_steps=4, batch_size=8, progress=False, num_virtual_tokens=2)  # fmt: skip
    assert result.steps == 4
    assert "data format: messages" in capsys.readouterr().err
    assert json.loads((out / "prefixtune_train.json").read_text())["data_format"] == "messages"
    records = cli.generate(prefix=str(out), prompt=["good movie"], max_new_tokens=3)
    assert "each prompt is a user turn in the chat template" in capsys.readouterr().err
    model, tok, _ = tasks.load_prefix(out)
    ids = tok(chat.generation_prompt(tok, [{"role": "user", "content": "good movie"}]), add_special_tokens=False,
              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[
            0, ids["input_ids"].shape[1] :
        ]
    assert records[0]["text"] == "good movie"
    assert records[0]["output"] == tok.decode(expected, skip_special_tokens=True).strip()


def test_string_prompt_completion_is_plain_text_with_the_loss_on_the_completion(tmp_path, chat_model_dir, capsys):
    rows = [{"prompt": r["text"] + " :", "completion": r["target"]} for r in tiny.copy_rows(16)]
    out = tmp_path / "run"
    cli.train(model=str(chat_model_dir), train_file=tiny.write_jsonl(tmp_path / "t.jsonl", rows), output_dir=str(out),
              max_steps=2, batch_size=8, progress=False, num_virtual_tokens=2)  # fmt: skip
    assert "data format: prompt/completion text" in capsys.readouterr().err
    assert json.loads((out / "prefixtune_train.json").read_text())["data_format"] == "text_pair"


def test_chat_rows_need_a_decoder(chat_model_dir):
    model = attach(tiny.make("bert", task="classification"), num_virtual_tokens=2)
    with pytest.raises(PrefixTuneError, match="chat data trains a decoder"):
        tasks.encode(model, chat_tokenizer(), [{"messages": CONVERSATION}], 64)
