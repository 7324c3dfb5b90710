"""The serving pieces without HTTP: prompt encoding and limits, streamed text, batch keys, the batch gatherer."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

import tiny  # noqa: E402

from prefixtune.serving.limits import RequestError, Settings  # noqa: E402
from prefixtune.serving.server import PrefixServer  # noqa: E402
from prefixtune.serving.work import ChoiceText, Sink, Work  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = tiny.tokenizer("decoder")
    model = tiny.make("llama", vocab_size=len(tok), pad_token_id=0, eos_token_id=3, bos_token_id=2)
    limits = Settings(max_batch_size=4, max_prompt_tokens=6, max_tokens_limit=10, reload_interval_s=None)
    return PrefixServer(model, tok, "causal_lm", tmp_path_factory.mktemp("prefixes"), "tiny", limits)


def work(server, prompts, **kw) -> Work:
    return Work("generate", None, prompts, Sink(asyncio.new_event_loop(), 8), **kw)


def refused(server, w: Work) -> str:
    with pytest.raises(RequestError) as caught:
        server.check_limits(w, None)
    assert caught.value.status == 400
    return str(caught.value)


def test_prompts_become_token_ids_in_every_accepted_shape(server):
    ids = server.encode("good movie")
    assert ids == [server.tokenizer("good movie")["input_ids"]]
    assert server.encode(["good", "bad film"]) == [*server.encode("good"), *server.encode("bad film")]
    assert server.encode(ids[0]) == ids and server.encode(ids) == ids  # ids, and lists of ids, pass through
    with pytest.raises(RequestError, match="the prompt is empty"):
        server.encode([])
    with pytest.raises(RequestError, match=r"token ids must be in \[0, "):
        server.encode([[1, 10_000]])


def test_each_limit_is_named_when_broken(server):
    server.check_limits(work(server, [[4, 5, 6]], max_tokens=10), None)  # at every limit: accepted
    assert "above this server's limit of 10" in refused(server, work(server, [[4]], max_tokens=11))
    assert "needs 6 batch rows" in refused(server, work(server, [[4], [5]], n=3, temperature=1.0, max_tokens=2))
    assert "the prompt has 7 tokens; the limit is 6" in refused(server, work(server, [[4] * 7], max_tokens=1))


def test_the_model_positions_bound_prompt_plus_new_tokens(server):
    server.max_positions, before = 12, server.max_positions
    try:
        assert "= 14 exceeds the model's 12 positions" in refused(server, work(server, [[4] * 6], max_tokens=8))
        assert server.room([[4] * 6], None) == 6  # a chat request without max_tokens gets what still fits
    finally:
        server.max_positions = before


def test_uvicorn_takes_only_the_connection_level_settings():
    from prefixtune.errors import PrefixTuneError
    from prefixtune.serving.app import uvicorn_config

    config = uvicorn_config(None, timeout_keep_alive=2, log_level="warning")
    assert config.timeout_keep_alive == 2 and config.limit_concurrency == 1024
    with pytest.raises(PrefixTuneError, match=r"unknown server option\(s\) \['max_batch_size'\]"):
        uvicorn_config(None, max_batch_size=3)


# ------------------------------------------------------------------------------ pure pieces of the worker
def test_a_choice_holds_back_text_that_may_start_a_stop_string_or_end_mid_character():
    pieces = {1: "Hello", 2: " wor", 3: "ld", 4: " EN", 5: "D", 6: "\ufffd"}
    choice = ChoiceText(lambda ids: "".join(pieces[i] for i in ids), stop=("END",))
    sent = []
    for token in (1, 2, 3, 4):
        choice.ids.append(token)
        sent.append(choice.delta())
    assert sent == ["Hel", "lo w", "or", "ld "]  # the last 2 characters could begin "END": held back
    choice.ids.append(5)
    assert choice.delta() == "" and choice.text() == "Hello world "  # the stop string never appears
    half = ChoiceText(lambda ids: "".join(pieces[i] for i in ids), stop=())
    half.ids += [1, 6]
    assert half.delta() == "Hello"  # an incomplete UTF-8 sequence waits for its next token
    half.finish = "length"
    assert half.delta() == "\ufffd"  # at the end, whatever is left goes out


def test_requests_share_a_model_call_only_with_equal_keys():
    def key(**kw):
        return work(None, [[4]], **kw).key

    assert key() == key(max_tokens=3) == key(top_p=0.5)  # greedy rows share, whatever else differs
    assert key(temperature=0.7) == key(temperature=0.7, max_tokens=2) != key(temperature=0.9)
    assert key(temperature=0.7, top_p=0.9) != key(temperature=0.7)
    assert Work("classify", None, [[4]], None).key == ("classify",) != key()


def test_the_batcher_gathers_what_fits_and_defers_the_rest_in_order():
    from prefixtune.serving.batcher import Batcher, Job

    batcher = Batcher(engine=None, max_batch_size=3, max_wait_ms=50)
    one, two = work(None, [[4]]), work(None, [[5]])
    big = work(None, [[6], [7], [8]])  # 3 rows: does not fit beside the first two
    job = Job(lambda: None)
    after = work(None, [[9]])
    for item in (one, job, two, big, after):
        batcher._queue.put(item)
    batcher._waiting = 4
    assert batcher._collect() == [one, two]  # the job met on the way waits until after the batch
    assert batcher._collect() is job
    assert batcher._collect() == [big]  # full: `after` stays queued for the next batch
    assert batcher._collect() == [after]
    assert batcher.pending() == 0 and batcher._collect() is None


# ------------------------------------------------------------------------------------- continuous batching
@pytest.mark.parametrize("family", ["llama", "bloom", "falcon"])
def test_running_batch_rows_join_and_leave_mid_stream_and_equal_generate_alone(family):
    """Rows of different lengths and prefixes join a decoding batch (padding either side) and leave it
    (trimming padding); every row's greedy tokens equal `PrefixCollection.generate` of that row alone,
    whether its prefix sits at the front of its cache rows or, covering some layers only, in the state."""
    import torch

    from prefixtune import attach
    from prefixtune.collection import PrefixCollection
    from prefixtune.serving.packed_linear import pack_linear_layers
    from prefixtune.serving.running_batch import Row, RunningBatch

    torch.manual_seed(0)
    model = tiny.make(family, vocab_size=40, pad_token_id=0, eos_token_id=3, initializer_range=0.2)
    bank = PrefixCollection(model)
    bank.add("p2", attach(model, num_virtual_tokens=2, init="random", seed=1))
    bank.add("p5", attach(model, method="prompt", num_virtual_tokens=5, init="random", seed=2))
    bank.add("top", attach(model, num_virtual_tokens=3, init="random", seed=3, layers=[1]))  # not in the cache
    prompts = {"a": ([5, 6, 7], "p2", 6), "b": ([8, 9, 10, 11, 12, 13, 14], None, 9), "c": ([15] * 11, "p5", 5),
               "d": ([16, 17], "top", 7)}  # fmt: skip
    expected = {}
    for key, (ids, name, steps) in prompts.items():
        out = bank.generate([name], input_ids=torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                            eos_token_id=None, pad_token_id=0)  # fmt: skip
        expected[key] = out[0, len(ids) :].tolist()
    assert pack_linear_layers(model)  # the batch's steps of several rows run through the packed weights
    batch = RunningBatch(model, bank["p2"].slots)
    got: dict[str, list[int]] = {}

    def join(key: str) -> None:
        ids, name, _ = prompts[key]
        row = Row(work=key, choices=[0], prompt=ids, inputs=None if name is None else bank[name].inputs())
        if key in ("a", "d"):  # a short prompt: one prefill forward
            logits, cache, mask = batch.prefill([row])
            logits = logits[0]
        else:  # chunked: four prompt tokens at a time
            while (logits := batch.feed(row, 4)) is None:
                pass
            cache, mask = row.cache, torch.ones(1, len(ids), dtype=torch.long)
        row.token = int(logits.argmax())
        got[key] = [row.token]
        batch.add([row], cache, mask)

    def step() -> None:
        logits = batch.step()
        for i, row in enumerate(batch.rows):
            row.token = int(logits[i].argmax())
            got[row.work].append(row.token)
        batch.keep([i for i, row in enumerate(batch.rows) if len(got[row.work]) < prompts[row.work][2]])

    join("a")
    step()
    join("b")  # longer than the running batch: the batch is padded
    step()
    join("c")  # longer again
    join("d")  # a prefix in some layers only stays in the attention state
    while batch.rows:
        step()  # "c" leaves first, then "a": their padding columns are trimmed
    assert batch.cache is None and got == expected


def test_packed_linear_layers_match_the_model_and_leave_its_modules_as_they_were():
    import torch

    from prefixtune.serving import packed_linear

    torch.manual_seed(0)
    model = tiny.make("llama", vocab_size=300, pad_token_id=0, eos_token_id=3, initializer_range=0.2).eval()
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    head = model.get_output_embeddings()
    keys = set(model.state_dict())
    ids = torch.randint(4, 300, (3, 5))
    inputs = [ids[:1, :1], ids[:, :2], ids]  # 1, 6 and 15 rows
    hidden = torch.randn(3, 5, head.in_features)
    with torch.no_grad():
        plain = [model(input_ids=x).logits for x in inputs]
        plain_head = head(hidden)
    assert packed_linear.pack_linear_layers(model) == len(layers) > 2  # attention, MLP and output projection
    assert packed_linear.pack_linear_layers(model) == 0  # packed once
    assert model.get_output_embeddings() is head and set(model.state_dict()) == keys
    assert all(type(m) is torch.nn.Linear for m in layers)
    calls = []
    default = torch.nn.functional.linear
    with pytest.MonkeyPatch.context() as patch:  # which path each call takes
        patch.setattr(torch.nn.functional, "linear", lambda *a: calls.append("default") or default(*a))
        with torch.no_grad():
            packed = [model(input_ids=x).logits for x in inputs]
            assert calls == ["default"] * len(layers)  # one row: the default path; several: the packed weights
            calls.clear()
            torch.testing.assert_close(head(hidden), plain_head, rtol=1e-5, atol=1e-5)
            assert calls == []
        trained = head(hidden.requires_grad_())  # gradients: the default path, which autograd knows
    assert calls == ["default"] and trained.requires_grad
    assert torch.equal(packed[0], plain[0])
    for got, want in zip(packed[1:], plain[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    classifier = tiny.make("bert", task="classification")  # no output projection onto a vocabulary: left alone
    assert packed_linear.pack_linear_layers(classifier) == 0
    assert not any(hasattr(m, "packed_weight") for m in classifier.modules())


def test_pick_samples_within_top_p_and_greedy_takes_the_argmax():
    import torch

    from prefixtune.serving.running_batch import pick

    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    sink = Sink(asyncio.new_event_loop(), 8)
    torch.manual_seed(0)
    wide = {pick(logits, Work("generate", None, [[1]], sink, temperature=1.0, top_p=0.7), None) for _ in range(300)}
    narrow = {pick(logits, Work("generate", None, [[1]], sink, temperature=1.0, top_p=0.4), None) for _ in range(50)}
    top1 = {pick(logits, Work("generate", None, [[1]], sink, temperature=1.0), 1) for _ in range(50)}
    assert wide == {0, 1} and narrow == {0} and top1 == {0}
    assert pick(torch.tensor([0.1, 2.0, 0.3]), Work("generate", None, [[1]], sink), None) == 1


def test_scheduler_is_chosen_where_the_model_allows_it(server):
    from prefixtune.serving.scheduler import ContinuousBatcher, unsupported

    assert isinstance(server.batcher, ContinuousBatcher) and unsupported(server.engine) is None
    engine = server.engine
    try:
        engine.generation_config.repetition_penalty = 1.3
        assert "repetition_penalty" in unsupported(engine)
    finally:
        engine.generation_config.repetition_penalty = None
    engine.task = "classification"
    try:
        assert "not a decoder" in unsupported(engine)
    finally:
        engine.task = "causal_lm"


def test_releasing_the_loading_threads_openmp_team_ends_its_helper_threads():
    """The worker thread's team must be the only one (see serving/openmp.py): the loading thread's parked
    helper threads end, and torch keeps computing on a fresh team afterwards."""
    import os
    import time
    from pathlib import Path

    import torch

    from prefixtune.serving.openmp import release_thread_pool

    if not torch.backends.openmp.is_available() or not Path("/proc/self/task").exists():
        pytest.skip("needs torch built with OpenMP and Linux's /proc")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.ones(1 << 22).mul_(2)  # a parallel region: this thread now has a team with a parked helper
        before = len(os.listdir("/proc/self/task"))
        assert release_thread_pool()
        deadline = time.monotonic() + 10
        while len(os.listdir("/proc/self/task")) >= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir("/proc/self/task")) < before
        assert float(torch.arange(1 << 22, dtype=torch.float64).mul(2).sum()) == float((1 << 22) * ((1 << 22) - 1))
    finally:
        torch.set_num_threads(threads)


def test_growing_cache_layer_matches_concatenation_and_appends_in_place():
    import torch

    from prefixtune.serving.growing_cache import GrowingLayer, fill_order

    gen = torch.Generator().manual_seed(0)

    def kv(rows, width):
        return torch.randn(rows, 2, width, 4, generator=gen), torch.randn(rows, 2, width, 4, generator=gen)

    layer, ref = GrowingLayer(), list(kv(3, 5))
    layer.update(*ref)
    for _ in range(70):  # past the first buffer's spare columns, so it grows once
        step = kv(3, 1)
        keys, values = layer.update(*step)
        ref = [torch.cat([r, s], 2) for r, s in zip(ref, step, strict=True)]
        assert torch.equal(keys, ref[0]) and torch.equal(values, ref[1])
    buffer = layer._keys.data_ptr()
    layer.update(*kv(3, 1))
    assert layer._keys.data_ptr() == buffer  # a step with room writes into the buffer, no copy
    ref = [layer.keys.clone(), layer.values.clone()]

    front = kv(3, 2)
    layer.prepend(*front)
    ref = [torch.cat([f, r], 2) for f, r in zip(front, ref, strict=True)]
    layer.pad_front(3)
    ref = [torch.cat([r.new_zeros(3, 2, 3, 4), r], 2) for r in ref]
    layer.drop_front(4)
    ref = [r[:, :, 4:] for r in ref]
    other = GrowingLayer()
    other.update(*kv(2, ref[0].shape[2]))
    layer.stack(other.keys, other.values)
    ref = [torch.cat([r, o]) for r, o in zip(ref, (other.keys, other.values), strict=True)]
    layer.batch_select_indices(torch.tensor([4, 0, 2, 3]))
    ref = [r[[4, 0, 2, 3]] for r in ref]
    assert torch.equal(layer.keys, ref[0]) and torch.equal(layer.values, ref[1])
    order = fill_order([1, 3], 4)
    assert order == [3, 1]  # the last kept row takes the first gap; row 1 stays
    buffer = layer._keys.data_ptr()
    layer.move_rows(order)
    ref = [r[order] for r in ref]
    assert torch.equal(layer.keys, ref[0]) and torch.equal(layer.values, ref[1])
    assert layer._keys.data_ptr() == buffer
    layer.stack(other.keys, other.values)  # two rows join into the spare rows, in place
    ref = [torch.cat([r, o]) for r, o in zip(ref, (other.keys, other.values), strict=True)]
    assert torch.equal(layer.keys, ref[0]) and layer._keys.data_ptr() == buffer
    layer.move_rows(fill_order([0, 2, 3], 4))
    ref = [r[[0, 3, 2]] for r in ref]
    assert torch.equal(layer.values, ref[1])
    keys, _ = layer.update(*kv(3, 1))
    assert torch.equal(keys[:, :, :-1], ref[0]) and layer.get_seq_length() == ref[0].shape[2] + 1
    with pytest.raises(ValueError, match="width"):
        layer.stack(other.keys, other.values)


@pytest.mark.parametrize("lengths", [[1, 1, 1, 4, 2], [1, 1], [3, 1, 2], [1, 5]])
def test_ragged_attention_equals_each_token_attending_its_own_row(lengths):
    """Packed tokens of rows feeding one token (attended one query each) and of prompts (in a block):
    each token sees exactly its row's visible columns up to its own, as plain attention would."""
    import torch

    from prefixtune.core.ragged import RaggedPlan, attend

    gen = torch.Generator().manual_seed(len(lengths))
    rows, width, heads, kv_heads, dim = len(lengths), 9, 4, 2, 8
    visible = torch.ones(rows, width, dtype=torch.bool)
    for r in range(rows):
        visible[r, : r % 3] = False  # left padding, never reaching the row's own tokens
    plan = RaggedPlan.build(lengths, visible)
    tokens = sum(lengths)
    query = torch.randn(1, heads, tokens, dim, generator=gen)
    key, value = (torch.randn(rows, kv_heads, width, dim, generator=gen) for _ in range(2))
    out = attend(plan, query, key, value, scale=None)
    assert out.shape == (1, tokens, heads, dim)
    assert plan.rows.tolist() == [r for r, n in enumerate(lengths) for _ in range(n)]
    assert plan.columns.tolist() == [width - n + k for n in lengths for k in range(n)]
    for t in range(tokens):
        r, c = int(plan.rows[t]), int(plan.columns[t])
        seen = visible[r].clone()
        seen[c + 1 :] = False
        k = key[r].repeat_interleave(heads // kv_heads, 0)[:, seen]
        v = value[r].repeat_interleave(heads // kv_heads, 0)[:, seen]
        weights = (query[0, :, t, None] @ k.transpose(1, 2) / dim**0.5).softmax(-1)
        torch.testing.assert_close(out[0, t], (weights @ v)[:, 0], atol=1e-5, rtol=1e-5)
