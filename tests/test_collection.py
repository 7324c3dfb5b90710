"""Mixed-prefix batches equal each row run alone; multi-task training equals training alone."""

from __future__ import annotations

import pytest
import tiny
import torch

from prefixtune import attach
from prefixtune.collection import PrefixCollection, UnknownPrefixError, per_prefix_loss

SPECS = {
    "short": {"method": "prefix", "num_virtual_tokens": 2, "seed": 1},
    "long": {"method": "prefix", "num_virtual_tokens": 5, "seed": 2, "reparam": "mlp"},
    "prompt": {"method": "prompt", "num_virtual_tokens": 3, "init": "random", "seed": 3},
    "words": {"method": "text", "text": "great film"},
}
ROWS = ["short", None, "long", "prompt", "words", "short"]


def collection(family: str, task: str | None = None, layers_for_short: bool = False) -> PrefixCollection:
    base = tiny.make(family, task=task)
    bank = PrefixCollection(base)
    for name, spec in SPECS.items():
        spec = dict(spec)
        if spec["method"] == "prefix":
            spec.setdefault("init", "random")
        if name == "short" and layers_for_short:
            spec["layers"] = [1]
        if name in ("long", "prompt") and task == "classification":  # mixed [CLS] and mean pooling
            spec["pooling"] = "mean"
        member = bank.add(name, attach(base, tokenizer=tiny.tokenizer("decoder"), **spec))
        with torch.no_grad():  # every prefix gets a head of its own, unlike the base model's
            for p in member.heads.parameters():
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    return bank


def batch(family: str, pad_side: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tiny.VOCAB, (len(ROWS), 6), generator=gen)
    mask = torch.ones_like(ids)
    for r, n in ((1, 2), (3, 1), (4, 3)):
        if pad_side == "right":
            mask[r, 6 - n :] = 0
        else:
            mask[r, :n] = 0
    kw = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    if tiny.kind(family) == "seq2seq":
        kw["decoder_input_ids"] = torch.randint(3, tiny.VOCAB, (len(ROWS), 3), generator=gen)
    return kw


def alone(bank: PrefixCollection, name: str | None, kw: dict, row: int, trim: bool) -> dict:
    keep = kw["attention_mask"][row].bool()
    one = {k: v[row : row + 1] for k, v in kw.items()}
    if trim:
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
    return one


@pytest.mark.parametrize(
    "family,task",
    [("bert", "classification"), ("llama", None), ("gpt2", None), ("t5", None), ("bart", None)]
    + [("deberta_v2", "classification"), ("deberta", "classification"), ("mpnet", "classification")]
    + [("bloom", None), ("falcon", None), ("falcon_new", None)],
)
def test_mixed_batch_rows_equal_rows_alone(family, task):
    bank = collection(family, task, layers_for_short=family == "llama")
    pad_side = "left" if tiny.kind(family) == "decoder" else "right"
    kw = batch(family, pad_side)
    with torch.no_grad():
        mixed = bank(ROWS, **kw).logits
        for r, name in enumerate(ROWS):
            one = alone(bank, name, kw, r, trim=True)
            if name is None:
                expected = bank.base_model(**one).logits[0]
            else:
                expected = bank[name](**one).logits[0]
            got = mixed[r]
            if tiny.kind(family) == "decoder":
                got = got[kw["attention_mask"][r].bool()]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "t5", "bart", "gpt2", "bloom", "falcon"])
def test_mixed_generation_equals_rows_alone(family):
    bank = collection(family)
    kw = batch(family, "left" if tiny.kind(family) == "decoder" else "right")
    kw.pop("decoder_input_ids", None)
    opts = {"max_new_tokens": 4, "do_sample": False}
    out = bank.generate(ROWS, **kw, **opts)
    for r, name in enumerate(ROWS):
        one = alone(bank, name, kw, r, trim=True)
        expected = (bank.base_model if name is None else bank[name]).generate(**one, **opts)[0]
        got = out[r]
        if tiny.kind(family) == "decoder":  # compare the new tokens; the prompt part carries padding
            got, expected = got[-4:], expected[-4:]
        else:
            got = got[: expected.shape[0]]
        assert torch.equal(got, expected), (name, got, expected)
    beams = bank.generate(ROWS, **kw, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    torch.manual_seed(0)
    sampled = bank.generate(ROWS, **kw, max_new_tokens=3, do_sample=True, top_p=0.9)
    assert beams.shape[0] == 2 * len(ROWS) and sampled.shape[0] == len(ROWS)


def test_unknown_prefix_and_wrong_row_count():
    bank = collection("llama")
    kw = batch("llama", "left")
    with pytest.raises(UnknownPrefixError, match="unknown prefix 'nope'"):
        bank(["nope"] * len(ROWS), **kw)
    with pytest.raises(ValueError, match="2 prefix names for a batch of 6 rows"):
        bank(["short", "long"], **kw)


def test_all_rows_without_prefix_is_the_base_model():
    bank = collection("llama")
    kw = batch("llama", "left")
    with torch.no_grad():
        torch.testing.assert_close(bank([None] * len(ROWS), **kw).logits, bank.base_model(**kw).logits)


def test_multitask_training_equals_training_each_prefix_alone():
    """Two tasks in shared batches, Adam, 4 steps; each prefix ends where it ends training alone."""
    gen = torch.Generator().manual_seed(0)
    steps = [(torch.randint(3, tiny.VOCAB, (6, 5), generator=gen), ["a", "b", "a", "b", "b", "a"]) for _ in range(4)]
    labels = {"a": lambda ids: ids % 3, "b": lambda ids: (ids // 7) % 3}

    def make_bank() -> PrefixCollection:
        base = tiny.make("bert", task="classification")
        bank = PrefixCollection(base)
        bank.add("a", attach(base, num_virtual_tokens=3, init="random", seed=1))
        bank.add("b", attach(base, num_virtual_tokens=4, init="random", seed=2))
        return bank

    shared = make_bank()
    opt = torch.optim.Adam(shared.trainable_parameters(), lr=1e-2)
    for ids, names in steps:
        y = torch.stack([labels[n](ids[i, 0]) for i, n in enumerate(names)])
        loss = per_prefix_loss(shared(names, input_ids=ids).logits, y, names)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for task in ("a", "b"):
        solo = make_bank()[task]
        opt = torch.optim.Adam([p for p in solo.parameters() if p.requires_grad], lr=1e-2)
        for ids, names in steps:
            rows = [i for i, n in enumerate(names) if n == task]
            y = torch.stack([labels[task](ids[i, 0]) for i in rows])
            loss = torch.nn.functional.cross_entropy(solo(input_ids=ids[rows]).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for (name, mine), theirs in zip(
            shared[task].state_tensors().items(), solo.state_tensors().values(), strict=True
        ):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5, msg=name)
        assert not torch.allclose(solo.prefix.table, make_bank()[task].prefix.table)  # it did train


def test_batch_assembly_needs_only_what_each_prefix_hands_it():
    """`core.batching` works from plain `PrefixInputs`: shorter prefixes are padded in front and masked, bare rows
    see none."""
    from prefixtune.core.batching import PrefixInputs, build_state, join_prompts

    def kv(length: int, fill: float) -> list:
        return [(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill)), None]

    short = PrefixInputs(kv=kv(2, 1.0), prompt=None, offset=2, heads=[], mean_pool=False)
    long = PrefixInputs(kv=kv(3, 2.0), prompt=None, offset=0, heads=[], mean_pool=True)
    slots = {torch.nn.Identity(): 0, torch.nn.Identity(): 1}
    state = build_state(slots, [(torch.tensor([0]), short), (torch.tensor([2]), long)], batch=3)
    keys, values, visible = state.kv[0]
    assert keys.shape == (3, 2, 3, 4) and state.kv[1] is None  # the widest prefix; slot 1 has none
    assert visible.tolist() == [[False, True, True], [False, False, False], [True, True, True]]  # right-aligned
    assert keys[0, :, 1:].eq(1).all() and keys[2].eq(2).all() and values[2].eq(-2).all() and keys[1].eq(0).all()
    assert state.offset.tolist() == [2, 0, 0] and len(state.mean_pool) == 1 and state.mean_pool[0].tolist() == [2]

    prompt = PrefixInputs(kv=None, prompt=torch.ones(2, 3), offset=0, heads=[], mean_pool=False)
    embeddings = torch.nn.Embedding(10, 3)
    with torch.no_grad():
        embeddings.weight.zero_()
    ids, mask = torch.tensor([[5, 6, 7], [5, 6, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    joined = join_prompts({"input_ids": ids, "attention_mask": mask}, [(torch.tensor([1]), prompt)], embeddings, 1)
    assert joined["inputs_embeds"].shape == (2, 5, 3)  # the prompt after the first token, then right padding
    assert joined["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert joined["inputs_embeds"][1, 1:3].eq(1).all() and joined["inputs_embeds"][0].eq(0).all()
