"""The flash prefix path, on CPU: the stock flash function of transformers runs unchanged (its unpadding,
its variable-length entry), over kernels emulated here with SDPA per sequence and a bottom-right causal
mask, the alignment of flash-attn 2.1 and later. Its logits must equal the SDPA prefix path's."""

from __future__ import annotations

import logging

import pytest
import tiny
import torch
import torch.nn.functional as F
from transformers import modeling_flash_attention_utils as fa_utils
from transformers.integrations import flash_attention

from prefixtune import attach
from prefixtune.collection import PrefixCollection
from prefixtune.core import flash

CALLS: list[str] = []


def _attend(q, k, v, scale, causal):  # one sequence, [n, heads, d] -> [n, heads, d]
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    n, m = q.shape[0], k.shape[0]
    mask = torch.ones(n, m, dtype=torch.bool).tril(m - n) if causal else None  # bottom-right
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)  # fmt: skip
    return out.transpose(0, 1)


def fake_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    CALLS.append("dense")
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                softmax_scale=None, causal=False):  # fmt: skip
    CALLS.append("varlen")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = [_attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], softmax_scale, causal)
              for i in range(len(cq) - 1)]  # fmt: skip
    return torch.cat(pieces)


@pytest.fixture
def emulated_flash(monkeypatch):
    kernels = (fake_flash, fake_varlen, None, fa_utils._pad_input, fa_utils._unpad_input)
    process = (fa_utils._lazy_define_process_function(fake_varlen), None)
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *a, **k: (kernels, process))
    monkeypatch.setattr(flash_attention, "_use_top_left_mask", False)
    CALLS.clear()
    flash._SAID.clear()
    yield


def as_flash(model):
    model.config._attn_implementation = "flash_attention_2"  # the kernel is emulated; skip the install check
    return model


def batch(left: bool) -> dict:
    ids = torch.randint(3, tiny.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row, n in ((1, 2), (2, 4)):
        mask[row, :n] = 0 if left else 1
        if not left:
            mask[row, 7 - n :] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_flash_path_equals_the_sdpa_path_with_and_without_padding(emulated_flash, family, caplog):
    task = "classification" if tiny.kind(family) == "encoder" else None
    kw = batch(left=tiny.kind(family) == "decoder")
    options = {"num_virtual_tokens": 3, "init": "random"}
    caplog.set_level(logging.INFO, logger="prefixtune")
    ours = attach(as_flash(tiny.make(family, task=task)), **options)
    stock = attach(tiny.make(family, task=task), **options)
    assert ours.config._attn_implementation == "prefixtune_flash_attention_2"
    with torch.no_grad():
        padded = ours(**kw).logits
        assert "varlen" in CALLS
        CALLS.clear()
        full = ours(input_ids=kw["input_ids"][:1]).logits  # no padding: no mask at all
        assert CALLS and set(CALLS) == {"dense"}
        expected = stock(**kw).logits
        if task is None:  # padding positions of a decoder hold nothing (flash leaves them zero)
            keep = kw["attention_mask"].bool()
            padded, expected = padded[keep], expected[keep]
        torch.testing.assert_close(padded, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, stock(input_ids=kw["input_ids"][:1]).logits, atol=1e-5, rtol=1e-5)
    assert "prefix attention: flash_attention_2" in caplog.text


def test_mixed_prefix_batch_and_cached_generation_take_the_flash_path(emulated_flash):
    """Rows with prefixes of different lengths (and none) are masked through the 2-D mask alone."""
    base, stock_base = as_flash(tiny.make("llama")), tiny.make("llama")
    banks = []
    for model in (base, stock_base):
        bank = PrefixCollection(model)
        bank.add("short", attach(model, num_virtual_tokens=2, init="random", seed=1))
        bank.add("long", attach(model, num_virtual_tokens=5, init="random", seed=2))
        banks.append(bank)
    kw = batch(left=True)
    names = ["short", None, "long"]
    keep = kw["attention_mask"].bool()
    with torch.no_grad():
        got, expected = banks[0](names, **kw).logits[keep], banks[1](names, **kw).logits[keep]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    opts = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(banks[0].generate(names, **kw, **opts), banks[1].generate(names, **kw, **opts))
    assert "varlen" in CALLS


def test_a_sliding_window_falls_back_to_sdpa_and_says_why(emulated_flash, caplog):
    kw = batch(left=True)
    with caplog.at_level(logging.INFO, logger="prefixtune"):
        ours = attach(as_flash(tiny.make("gemma3")), num_virtual_tokens=3, init="random")
        with torch.no_grad():
            got = ours(**kw).logits
    stock = attach(tiny.make("gemma3"), num_virtual_tokens=3, init="random")
    keep = kw["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(got[keep], stock(**kw).logits[keep], atol=1e-5, rtol=1e-5)
    assert "sdpa instead of flash_attention_2, because a flash kernel cannot keep the prefix visible with " \
           "sliding_window" in caplog.text  # fmt: skip


def test_old_flash_kernels_align_top_left_so_they_are_not_used(emulated_flash, monkeypatch):
    monkeypatch.setattr(flash_attention, "_use_top_left_mask", True)
    assert "top-left" in flash.why_not({})
    assert flash.why_not({"position_bias": torch.zeros(1)}) is not None


def test_the_fallback_mask_matches_the_2d_mask_and_window():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    full = flash.to_full(mask, q_len=2, kv_len=4, causal=True, window=2)
    assert full.shape == (2, 1, 2, 4)
    # query 0 sits at position 2 (bottom-right): it sees keys 1..2; query 1 sees keys 2..3
    assert full[1, 0].tolist() == [[False, True, True, False], [False, False, True, True]]
    assert full[0, 0, 0].tolist() == [False, True, True, False]
    assert flash.to_full(None, 2, 4, causal=True) is None
    wide = flash.widen(mask, 2, 4, 2, torch.tensor([[False, True], [True, True]]))
    assert wide.tolist() == [[0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_the_gpu_benchmark_script_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    """`benchmarks/gpu.py` waits for a lent GPU; its --quick mode runs the same code here so it cannot rot."""
    from benchmarks import gpu

    monkeypatch.setattr(gpu, "RESULTS", tmp_path)
    result = gpu.main(["--quick"])
    assert result["correctness"]["cached_equals_uncached_greedy"] is True
    assert set(result["train"]["32"]["step_s"]) == {"prefixtune (sdpa)", "PEFT prefix tuning", "frozen, no prefix"}
    assert (tmp_path / "gpu-quick.json").exists()
    text = gpu.section(result)
    assert "Device: CPU (smoke test)" in text and "prefixtune/PEFT" in text and "| 32 |" in text
