"""Same prefix values, same logits as PEFT: the position and layout conventions match PEFT's."""

from __future__ import annotations

import pytest
import tiny
import torch

from prefixtune import attach

peft = pytest.importorskip("peft")


def peft_model(family: str, method: str):
    base = tiny.make(family)
    if method == "prefix":
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # PEFT starts prefixes at zero-ish values; make them distinctive
        weight = model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    return model, weight.detach().clone()


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "llama_mqa"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_same_values_same_logits_as_peft(family, method):
    theirs, weight = peft_model(family, method)
    ours = attach(tiny.make(family), method=method, num_virtual_tokens=4, init="zero")
    with torch.no_grad():
        if method == "prefix":
            ours.prefix.table.copy_(weight.view(ours.prefix.table.shape))
        else:
            ours.prefix.embedding.copy_(weight)
    ids = torch.randint(3, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        if method == "prompt":
            expected = expected[:, 4:]  # PEFT returns logits for the prompt positions too
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Greedy generation equals PEFT's forward pass recomputed token by token. (PEFT's own cached
    # `generate` drifts from that recomputation on some of these models, so it is not the reference.)
    with torch.no_grad():
        seq = ids
        for _ in range(5):
            logits = theirs(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        got_gen = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(got_gen, seq)
