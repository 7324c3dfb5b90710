"""Every mistake gets a PrefixTuneError (a ValueError) that names what was wrong."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
import transformers as tf

from prefixtune import PrefixConfig, PrefixModel, PrefixTuneError, attach
from prefixtune.serialization import CONFIG_NAME, WEIGHTS_NAME


@pytest.mark.parametrize("length", [0, -3])
def test_prefix_length_must_be_positive(length):
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PrefixConfig(num_virtual_tokens=length)


def test_layers_out_of_range():
    with pytest.raises(ValueError, match=r"layer indices \[2, -1\] out of range: the model has 2 layers"):
        attach(tiny.make("llama"), layers=[0, 2, -1])


def test_unknown_method_and_init():
    with pytest.raises(ValueError, match="method must be one of prefix, prompt, text; got 'lora'"):
        PrefixConfig(method="lora")
    with pytest.raises(ValueError, match="init 'text' needs a non-empty `text`"):
        PrefixConfig(init="text")


def test_text_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs the tokenizer"):
        attach(tiny.make("llama"), method="text", text="hello")


@pytest.fixture
def saved(tmp_path):
    attach(tiny.make("llama"), num_virtual_tokens=2).save_pretrained(tmp_path)
    return tmp_path


def test_prefix_for_another_model_names_both(saved):
    with pytest.raises(ValueError, match=r"made for LlamaForCausalLM .* loaded onto GPT2LMHeadModel"):
        PrefixModel.from_pretrained(tiny.make("gpt2"), saved)
    with pytest.raises(ValueError, match="differ in num_layers"):
        PrefixModel.from_pretrained(tiny.make("llama", num_hidden_layers=3), saved)
    with pytest.raises(ValueError, match="differ in kv_heads"):
        PrefixModel.from_pretrained(tiny.make("llama_mqa"), saved)


def test_missing_folder_and_files(saved, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PrefixModel.from_pretrained(tiny.make("llama"), tmp_path / "nowhere")
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="prefix file .* is missing"):
        PrefixModel.from_pretrained(tiny.make("llama"), saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=f"has no {CONFIG_NAME}"):
        PrefixModel.from_pretrained(tiny.make("llama"), saved)


def test_corrupt_tensor_file(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        PrefixModel.from_pretrained(tiny.make("llama"), saved)


def test_one_safetensors_reader_names_the_file_and_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    from prefixtune.serialization import read_safetensors

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(path))
    assert set(read_safetensors(path, "checkpoint file")) == {"a", "b"}
    assert list(read_safetensors(path, "checkpoint file", ["b"])) == ["b"]
    with pytest.raises(PrefixTuneError, match=r"PEFT adapter file .*t.safetensors' holds no \['prompt_embeddings'\]"):
        read_safetensors(path, "PEFT adapter file", ["prompt_embeddings"])
    path.write_bytes(b"not safetensors")
    with pytest.raises(PrefixTuneError, match="checkpoint file .* is corrupt or not safetensors"):
        read_safetensors(path, "checkpoint file")
    with pytest.raises(PrefixTuneError, match="checkpoint file .* is missing"):
        read_safetensors(tmp_path / "gone.safetensors", "checkpoint file")


def test_corrupt_and_invalid_config(saved):
    path = saved / CONFIG_NAME
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PrefixModel.from_pretrained(tiny.make("llama"), saved)
    bad = dict(good, prefix=dict(good["prefix"], surprise=1))
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"unknown prefix config key\(s\) \['surprise'\]"):
        PrefixModel.from_pretrained(tiny.make("llama"), saved)
    bad = dict(good, prefix=dict(good["prefix"], num_virtual_tokens="16"))
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'num_virtual_tokens' has the wrong type"):
        PrefixModel.from_pretrained(tiny.make("llama"), saved)


def test_tensor_shape_must_match_config(saved):
    from safetensors.torch import save_file

    save_file({"prefix": torch.zeros(3, 2, 2, 2, 8)}, str(saved / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"tensor 'prefix' has shape \(3, 2, 2, 2, 8\)"):
        PrefixModel.from_pretrained(tiny.make("llama"), saved)


def test_pickle_files_are_refused_with_advice(tmp_path):
    (tmp_path / "adapter.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="never loads because they can run code"):
        PrefixModel.from_pretrained(tiny.make("llama"), tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        lambda: tf.XLNetConfig(vocab_size=96, d_model=32, n_layer=2, n_head=4, d_inner=64),
        lambda: tf.SqueezeBertConfig(
            vocab_size=96,
            hidden_size=32,
            embedding_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
    ],
)
def test_architectures_outside_the_interface_are_named(config):
    model = tf.AutoModelForSequenceClassification.from_config(config())
    with pytest.raises(PrefixTuneError, match=f"{type(model).__name__} .* does not send its attention"):
        attach(model)


@pytest.mark.parametrize(
    "config,cls,reason",
    [
        (
            lambda: tf.DebertaConfig(
                vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                talking_head=True,
            ),
            tf.AutoModelForSequenceClassification,
            "talking heads mixes the scores of all heads",
        ),
        (
            lambda: tf.FalconConfig(
                vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True
            ),
            tf.AutoModelForCausalLM,
            r"Falcon with ALiBi \(Falcon-RW\)",
        ),
    ],
)  # fmt: skip
def test_adapted_families_refuse_the_variants_they_cannot_take(config, cls, reason):
    model = cls.from_config(config())
    with pytest.raises(PrefixTuneError, match=reason):
        attach(model)
