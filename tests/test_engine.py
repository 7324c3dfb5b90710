"""The core promises, checked on a tiny model of every family."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes as bloom_alibi_slopes

from prefixtune import PrefixConfig, PrefixModel, attach
from prefixtune.core import own_attention

FAMILIES = list(tiny.FAMILIES)
torch.set_grad_enabled(True)


def inputs(family: str, batch: int = 3, length: int = 7, seed: int = 1, pad_side: str = "right") -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tiny.VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # rows get shorter and shorter
        n = min(2 * row, length - 2)
        if pad_side == "right":
            mask[row, length - n :] = 0
        else:
            mask[row, :n] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = {"input_ids": ids, "attention_mask": mask}
    if family in ("bert",):
        kw["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=gen)
    if tiny.kind(family) == "seq2seq":
        kw["decoder_input_ids"] = torch.randint(3, tiny.VOCAB, (batch, 4), generator=gen)
    return kw


def wrapped(family: str, **options) -> PrefixModel:
    options.setdefault("num_virtual_tokens", 3)
    options.setdefault("init", "random")
    return attach(tiny.make(family), **options)


def rows(kw: dict, index: int) -> dict:
    """Row `index` alone, with its padding removed."""
    keep = kw["attention_mask"][index].bool()
    out = {k: (v[index : index + 1, keep] if k != "decoder_input_ids" else v[index : index + 1]) for k, v in kw.items()}
    return out


# ------------------------------------------------------------------------------------- reference
REF: dict = {}


def reference_attention(module, q, k, v, mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """Textbook attention over [prefix; keys], written without any of prefixtune's code."""
    pk, pv = REF[module]
    batch, plen, kv_len = q.shape[0], pk.shape[2], k.shape[2]
    k = torch.cat([pk.expand(batch, -1, -1, -1), k], 2)
    v = torch.cat([pv.expand(batch, -1, -1, -1), v], 2)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(batch, 1, q.shape[2], plen + kv_len, dtype=torch.bool)
    if mask is not None:
        body = mask[..., :kv_len]
        allowed[..., plen:] = body if body.dtype == torch.bool else body > torch.finfo(body.dtype).min / 2
        if body.dtype != torch.bool:  # an additive mask (MPNet) adds its values to the scores it allows
            scores[..., plen:] = scores[..., plen:] + body.clamp(min=-1e4)
    elif kwargs.get("is_causal", getattr(module, "is_causal", False)) and q.shape[2] > 1:
        allowed[..., plen:] = torch.ones(q.shape[2], kv_len, dtype=torch.bool).tril(kv_len - q.shape[2])
    if position_bias is not None:
        scores[..., plen:] = scores[..., plen:] + position_bias[..., :kv_len]
    if type(module).__name__ == "BloomAttention":  # ALiBi: prefix key k of P sits at k - P, before token 0
        slopes = bloom_alibi_slopes(q.shape[1], q.device)
        scores[..., :plen] = scores[..., :plen] + slopes.view(1, -1, 1, 1) * torch.arange(-plen, 0)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("reference_test", reference_attention)
AttentionMaskInterface.register("reference_test", eager_mask)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_prefix_and_head(family):
    task = "classification" if tiny.kind(family) == "encoder" else None
    model = wrapped(family, reparam="mlp" if family in ("llama", "t5") else "none")
    kw = inputs(family)
    out = model(**kw, labels=torch.tensor([0, 1, 2]) if task or tiny.kind(family) == "encoder" else None)
    loss = out.loss if out.loss is not None else out.logits.float().pow(2).mean()
    if tiny.kind(family) != "encoder":
        loss = out.logits.float().logsumexp(-1).mean()
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name.startswith("prefix."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif name.startswith("heads."):
            assert p.grad is not None, name
        else:
            assert p.grad is None and name not in trainable, name
    report = model.trainable_parameters()
    assert 0 < report["trainable"] < report["total"] and 0 < report["percent"] < 100


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_prefix_is_the_untouched_model(family):
    model = wrapped(family)
    plain = tiny.make(family)
    kw = inputs(family)
    with torch.no_grad(), model.disable_prefix():
        ours = model(**kw).logits
    with torch.no_grad():
        theirs = plain(**kw).logits
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert (model(**kw).logits - theirs).abs().max() > 1e-5  # and the prefix does change them


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_row_does_not_depend_on_batch_padding(family, method):
    model = wrapped(family, method=method)
    sides = ["right", "left"] if tiny.kind(family) == "decoder" else ["right"]
    for side in sides:
        kw = inputs(family, pad_side=side)
        with torch.no_grad():
            batch = model(**kw).logits
            for i in range(kw["input_ids"].shape[0]):
                alone = model(**rows(kw, i)).logits[0]
                got = batch[i]
                if tiny.kind(family) == "decoder":  # encoders here are classifiers: one row of logits
                    got = got[kw["attention_mask"][i].bool()]
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


# every family over sdpa; eager delegation on one model of each kind (and Gemma 3's sliding window)
REFERENCE_CASES = [(f, "sdpa") for f in FAMILIES] + [(f, "eager") for f in ("bert", "llama", "t5", "gemma3")]


@pytest.mark.parametrize("family,base", REFERENCE_CASES)
def test_matches_handwritten_reference_attention(family, base):
    model = attach(tiny.make(family, attn_implementation=base), num_virtual_tokens=3, init="random")
    reference = tiny.make(family)
    if not own_attention.install(reference, "reference_test"):
        reference.set_attn_implementation("reference_test")
    kv = model.prefix_kv()
    ref_modules = dict(reference.named_modules())
    REF.clear()
    for slot, pair in zip(model.layout.slots, kv, strict=True):
        REF[ref_modules[slot.name]] = pair
    kw = inputs(family)
    ref_kw = dict(kw)
    if tiny.kind(family) == "decoder":  # the reference gets the PEFT position convention spelled out
        ref_kw["position_ids"] = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0) + 3
    with torch.no_grad():
        ours, theirs = model(**kw).logits, reference(**ref_kw).logits
    if tiny.kind(family) == "decoder":
        keep = kw["attention_mask"].bool()
        ours, theirs = ours[keep], theirs[keep]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_grouped_keys_reach_sdpa_uncopied_with_the_stock_numbers(monkeypatch):
    """On CPU grouped K/V go to SDPA as they are (no repeat_kv copy); logits and gradients stay the stock ones."""
    from prefixtune.core import attention

    model, kw = wrapped("llama"), inputs("llama")
    taken = []
    grouped = attention._grouped_sdpa
    monkeypatch.setattr(attention, "_grouped_sdpa", lambda *a, **k: taken.append(grouped(*a, **k)) or taken[-1])

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = model(**kw).logits
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return logits.detach(), grads

    ours = step()
    assert (
        len(taken) == model.config.num_hidden_layers
        and model.config.num_key_value_heads < model.config.num_attention_heads
    )
    monkeypatch.setattr(attention, "_grouped_sdpa", lambda *a, **k: None)  # the stock sdpa with repeat_kv
    stock = step()
    torch.testing.assert_close(ours[0], stock[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(ours[1], stock[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if tiny.kind(f) != "encoder"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_cached_generation_equals_uncached_greedy(family, method):
    model = wrapped(family, method=method)
    kw = inputs(family, pad_side="left" if tiny.kind(family) == "decoder" else "right")
    kw.pop("decoder_input_ids", None)
    new = 5
    eos = model.generation_config.eos_token_id

    def no_eos(logits):  # what min_new_tokens does inside generate
        return logits if eos is None else logits.index_fill(-1, torch.tensor([eos]).flatten(), float("-inf"))

    out = model.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
    with torch.no_grad():
        if tiny.kind(family) == "decoder":
            seq, mask = kw["input_ids"], kw["attention_mask"]
            for _ in range(new):
                nxt = no_eos(model(input_ids=seq, attention_mask=mask).logits[:, -1]).argmax(-1, keepdim=True)
                seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            expected = seq if out.shape[1] == seq.shape[1] else seq[:, kw["input_ids"].shape[1] :]
        else:
            start = model.config.decoder_start_token_id
            seq = torch.full((kw["input_ids"].shape[0], 1), start)
            for _ in range(new):
                nxt = no_eos(model(**kw, decoder_input_ids=seq).logits[:, -1]).argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
            expected = seq
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", [f for f in FAMILIES if tiny.kind(f) != "encoder"])
def test_sampling_and_beam_search_run(family):
    model = wrapped(family)
    kw = inputs(family, batch=2, pad_side="left" if tiny.kind(family) == "decoder" else "right")
    kw.pop("decoder_input_ids", None)
    torch.manual_seed(0)
    sampled = model.generate(**kw, max_new_tokens=4, do_sample=True, top_p=0.9, num_return_sequences=2)
    beams = model.generate(**kw, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert sampled.shape[0] == 4 and beams.shape[0] == 4
    # beam search's best hypothesis with one beam equals greedy
    one = model.generate(**kw, max_new_tokens=4, num_beams=1, do_sample=False)
    assert one.shape[0] == 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prefix", "prompt", "text"])
def test_save_load_round_trip(family, method, tmp_path):
    options = {"method": method, "text": "great movie"} if method != "prefix" else {"reparam": "mlp"}
    model = attach(
        tiny.make(family, task="classification" if tiny.kind(family) == "encoder" else None),
        num_virtual_tokens=3,
        tokenizer=tiny.tokenizer("decoder"),
        **options,
    )
    kw = inputs(family)
    with torch.no_grad():
        before = model(**kw).logits
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["prefixtune_config.json", "prefixtune_model.safetensors"]
    assert (tmp_path / "prefixtune_model.safetensors").stat().st_size < 1_000_000  # MLP included
    loaded = PrefixModel.from_pretrained(
        tiny.make(family, task="classification" if tiny.kind(family) == "encoder" else None, seed=5 if False else 0),
        tmp_path,
    )
    with torch.no_grad():
        after = loaded(**kw).logits
    torch.testing.assert_close(before, after, atol=1e-6, rtol=0)
    assert loaded.trainable_parameters()["trainable"] == 0


def test_mlp_is_collapsed_for_inference_and_resumable_for_training(tmp_path):
    model = wrapped("llama", reparam="mlp")
    model.save_pretrained(tmp_path)
    inference = PrefixModel.from_pretrained(tiny.make("llama"), tmp_path)
    assert not inference.prefix.reparameterised
    resumed = PrefixModel.from_pretrained(tiny.make("llama"), tmp_path, is_trainable=True)
    assert resumed.prefix.reparameterised
    assert all(p.requires_grad for p in resumed.prefix.parameters())
    torch.testing.assert_close(resumed.prefix(), model.prefix())
    slim = tmp_path / "slim"
    model.save_pretrained(slim, keep_reparam=False)
    name = "prefixtune_model.safetensors"
    assert (slim / name).stat().st_size < (tmp_path / name).stat().st_size


def test_only_some_layers_get_a_prefix():
    model = wrapped("llama", layers=[1])
    assert model.columns == [None, 0]
    assert model.prefix.table.shape[1] == 1
    kv = model.prefix_kv()
    assert kv[0] is None and kv[1] is not None


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_text_prefix_equals_prepending_the_text(family):
    """On a decoder, init from text (and method 'text') is the discrete prefix, exactly."""
    tok = tiny.tokenizer("decoder")
    text = "say the title :"
    text_ids = torch.tensor([tok(text)["input_ids"]])
    window = {"sliding_window": 64}  # a prefix stays visible to every query; a text may slide out of a window
    plain = tiny.make(family, **window)
    ids = torch.randint(3, tiny.VOCAB, (1, 6))
    with torch.no_grad():
        expected = plain(input_ids=torch.cat([text_ids, ids], 1)).logits[:, text_ids.shape[1] :]
    for options in ({"method": "text"}, {"method": "prefix", "init": "text"}, {"method": "prompt", "init": "text"}):
        length = text_ids.shape[1]
        model = attach(tiny.make(family, **window), tokenizer=tok, text=text, num_virtual_tokens=length, **options)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_config_help_text_everywhere():
    import dataclasses

    for f in dataclasses.fields(PrefixConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = wrapped("llama")
        if checkpointing:
            model.gradient_checkpointing_enable()
        layers = [m for m in model.base_model.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing == checkpointing for m in layers)
        model.train()
        kw = inputs("llama")
        loss = model(**kw, labels=kw["input_ids"]).loss
        loss.backward()
        grads.append(model.prefix.table.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0


def test_a_model_is_probed_once_until_its_modules_change():
    """Loading many prefixes onto one model must not run a forward pass per prefix."""
    from prefixtune.core.discovery import probe

    model = tiny.make("llama")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    first = probe(model)
    assert probe(model) == first and len(calls) == 1
    attach(model, num_virtual_tokens=2)  # attaching reuses the layout too
    assert len(calls) == 1
    model.model.layers[0].self_attn = copy.deepcopy(model.model.layers[0].self_attn)  # a module replaced
    assert probe(model) == first and len(calls) == 2


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_step_by_step_decoding_with_a_cache_equals_the_whole_forward(name):
    """A decoder called by hand with its cache (no mask, no positions) still puts real tokens after the prefix."""
    model = attach(tiny.make("llama"), num_virtual_tokens=3, init="random")
    ids = torch.randint(5, 40, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1]
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=ids[:, -1:], **{name: cache}).logits[:, -1]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)
