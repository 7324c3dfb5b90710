"""The flex prefix path on CPU: the model's block mask widened by the prefix columns, run by flex attention
uncompiled (its reference path; compiling on CPU takes minutes). Logits must equal the SDPA prefix path's."""

from __future__ import annotations

import logging

import pytest
import tiny
import torch
from torch.nn.attention.flex_attention import flex_attention
from transformers.integrations import flex_attention as transformers_flex

from prefixtune import attach
from prefixtune.collection import PrefixCollection
from prefixtune.core import flash

# Uncompiled is the point here: torch's advice to compile would cost minutes per test on CPU.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def uncompiled_flex(monkeypatch):
    def run(query, key, value, score_mod=None, block_mask=None, enable_gqa=False, scale=None, kernel_options=None,
            training=False, **lse):  # fmt: skip
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa,
                              scale=scale, **lse)  # fmt: skip

    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention", run)
    flash._SAID.clear()


def batch() -> dict:
    ids = torch.randint(5, tiny.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2], mask[2, :4] = 0, 0  # left padding
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def banks(family: str, task: str | None = None) -> list[PrefixCollection]:
    out = []
    for implementation in ("flex_attention", "sdpa"):
        base = tiny.make(family, task=task)
        base.set_attn_implementation(implementation)
        bank = PrefixCollection(base)
        bank.add("short", attach(base, num_virtual_tokens=2, init="random", seed=1))
        bank.add("long", attach(base, num_virtual_tokens=4, init="random", seed=2))
        out.append(bank)
    return out


@pytest.mark.parametrize("family,task", [("llama", None), ("bert", "classification")])
def test_flex_path_equals_the_sdpa_path_on_a_mixed_padded_batch(uncompiled_flex, family, task, caplog):
    caplog.set_level(logging.INFO, logger="prefixtune")
    flex, sdpa = banks(family, task)
    assert flex.base_model.config._attn_implementation == "prefixtune_flex_attention"
    kw = batch() if task is None else {k: v.flip(1) for k, v in batch().items()}  # encoders: right padding
    rows = ["short", None, "long"]
    with torch.no_grad():
        got, expected = flex(rows, **kw).logits, sdpa(rows, **kw).logits
    if task is None:  # a decoder's padding positions hold nothing comparable
        keep = kw["attention_mask"].bool()
        got, expected = got[keep], expected[keep]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "prefix attention: flex_attention, its block mask widened" in caplog.text


def test_cached_generation_with_mixed_prefixes_takes_the_flex_path(uncompiled_flex):
    flex, sdpa = banks("llama")
    kw, rows = batch(), ["short", None, "long"]
    opts = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(flex.generate(rows, **kw, **opts), sdpa.generate(rows, **kw, **opts))
