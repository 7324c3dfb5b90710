"""PEFT adapters in and out: trained with peft itself, logits equal both ways."""

from __future__ import annotations

import json

import pytest
import tiny
import torch

from prefixtune.errors import PrefixTuneError
from prefixtune.peft_interop import convert, from_peft, to_peft

peft = pytest.importorskip("peft")

IDS = torch.randint(3, tiny.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def trained_peft(family: str, method: str, tmp_path):
    # PEFT sizes a prefix by the query heads; Falcon's multi-query cache holds one key/value head
    heads = {"num_attention_heads": 1, "token_dim": 8} if (family, method) == ("falcon", "prefix") else {}
    config = (peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=4, **heads
    )
    model = peft.get_peft_model(tiny.make(family), config)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    return model


def peft_logits(model) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    return logits[:, -IDS.shape[1] :]  # prompt tuning also returns the virtual positions


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "falcon", "falcon_new"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_import_and_export_keep_logits(family, method, tmp_path):
    theirs = trained_peft(family, method, tmp_path)
    expected = peft_logits(theirs)
    ours = from_peft(tiny.make(family), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)
    to_peft(ours, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(tiny.make(family), tmp_path / "back").eval()
    torch.testing.assert_close(peft_logits(again), expected, atol=1e-5, rtol=1e-5)
    # and the CLI-level helper picks the direction by itself
    assert convert(tiny.make(family), tmp_path / "peft", tmp_path / "ours") == "from-peft"
    assert convert(tiny.make(family), tmp_path / "ours", tmp_path / "peft2") == "to-peft"


def test_lora_adapter_is_refused(tmp_path):
    lora = peft.get_peft_model(tiny.make("llama"), peft.LoraConfig(task_type="CAUSAL_LM", r=2))
    lora.save_pretrained(tmp_path)
    with pytest.raises(PrefixTuneError, match="peft_type 'LORA' is not a prefix"):
        from_peft(tiny.make("llama"), tmp_path)


def test_mismatching_base_model_is_refused(tmp_path):
    trained_peft("llama", "prefix", tmp_path)
    with pytest.raises(PrefixTuneError, match=r"does not fit GPT2LMHeadModel"):
        from_peft(tiny.make("gpt2"), tmp_path / "peft")


@pytest.mark.parametrize(
    "change", [{"task_type": "TOKEN_MAGIC"}, {"num_virtual_tokens": -2}, {"surprise": 1}, {"prefix_projection": "yes"}]
)
def test_unknown_config_values_are_refused(change, tmp_path):
    trained_peft("llama", "prefix", tmp_path)
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(PrefixTuneError, match="unsupported value|unknown PEFT config key"):
        from_peft(tiny.make("llama"), tmp_path / "peft")


def test_convert_verb_both_ways(tmp_path):
    from transformers import AutoModelForCausalLM

    from prefixtune import PrefixModel, cli

    folder = tiny.save("llama", tmp_path / "llama")
    theirs = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_()
    theirs.eval().save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    assert (
        cli.main(["convert", "--model", folder, "--source", str(tmp_path / "adapter"), "--output", str(tmp_path / "p")])
        == 0
    )
    ours = PrefixModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert (
        cli.main(["convert", "--model", folder, "--source", str(tmp_path / "p"), "--output", str(tmp_path / "b")]) == 0
    )
    again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert cli.main(["convert", "--model", folder, "--source", str(tmp_path / "nowhere"), "--output", "x"]) == 2


def test_serve_verb_is_wired(tmp_path, capsys):
    from prefixtune import cli

    assert cli.main(["serve", "--model", str(tmp_path / "no-model"), "--prefixes", str(tmp_path)]) == 2
    assert "cannot load model" in capsys.readouterr().err
