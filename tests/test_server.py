"""The live server on 127.0.0.1, driven by the official `openai` client and httpx.

A tiny random Llama with a real (word-level) tokenizer serves five prefixes of every method. Greedy
answers must equal offline `PrefixModel.generate` on the same prompt, token for token, whatever
else shares the batch.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import tiny  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from prefixtune import PrefixModel, attach  # noqa: E402
from prefixtune.serving.app import create_app, running  # noqa: E402

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue green big small house tree car road sky sun moon star "
    "river hill park bird fish song book door light dark cold warm happy sad old new day night rain snow wind "
    "fire stone water city town good bad film movie"
).split()
CHAT_WORDS, CHAT_TEMPLATE = tiny.CHAT_WORDS, tiny.CHAT_TEMPLATE
PREFIXES = {
    "alpha": {"method": "prefix", "num_virtual_tokens": 2, "init": "random", "seed": 1},
    "beta": {"method": "prefix", "num_virtual_tokens": 5, "init": "random", "seed": 2, "reparam": "mlp"},
    "gamma": {"method": "prompt", "num_virtual_tokens": 3, "init": "random", "seed": 3},
    "delta": {"method": "text", "text": "the old city"},
    "flaky": {"method": "prefix", "num_virtual_tokens": 4, "init": "random", "seed": 5},
}
PROMPTS = [
    "the cat sat on",
    "a dog ran",
    "red blue green big small house tree",
    "sky",
    "the old river hill park bird",
    "cold rain and snow",
    "happy day",
    "a new book on the door",
]
LIMIT = 12  # max_tokens_limit of the llama server
TOKEN = "s3cret-admin-token"


def clients(url: str) -> tuple:
    """No retries (they would hide errors) and a keep-alive shorter than the server's, so a reused
    connection is never one the server is closing."""
    http = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(keepalive_expiry=1))
    api = openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        http_client=httpx.Client(limits=httpx.Limits(keepalive_expiry=1, max_connections=32)),
    )
    return api, http


class Offline:
    """The same model and prefixes loaded without the server: the expected answers."""

    def __init__(self, model_dir: Path, prefixes_dir: Path):
        self.tok = tf.AutoTokenizer.from_pretrained(model_dir)
        self.base = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.members = {p.name: PrefixModel.from_pretrained(self.base, p) for p in sorted(prefixes_dir.iterdir())}
        self.eos = self.base.generation_config.eos_token_id
        self.cache: dict = {}
        self.lock = threading.Lock()

    def chat_ids(self, content: str) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def tokens(self, name: str | None, ids: list[int]) -> list[int]:
        """Greedy new tokens (up to LIMIT, EOS excluded) of `ids` alone with prefix `name`."""
        key = (name, tuple(ids))
        with self.lock:
            if key not in self.cache:
                model = self.base if name is None else self.members[name]
                x = torch.tensor([ids])
                out = model.generate(
                    input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=LIMIT, do_sample=False
                )
                new = out[0, len(ids) :].tolist()
                self.cache[key] = new[: new.index(self.eos)] + [self.eos] if self.eos in new else new
            return self.cache[key]

    def answer(self, name: str | None, ids: list[int], max_tokens: int) -> tuple[str, str, int]:
        """(text, finish_reason, completion_tokens) as the server must report them."""
        new = self.tokens(name, ids)[:max_tokens]
        if self.eos in new:
            new = new[: new.index(self.eos)]
            return self.tok.decode(new, skip_special_tokens=True), "stop", len(new)
        return self.tok.decode(new, skip_special_tokens=True), "length", len(new)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    yield from serve_llama(tmp_path_factory, "continuous")


@pytest.fixture(scope="module")
def llama_batch(tmp_path_factory):
    """The same server with the dynamic batcher, which decoders can still ask for (`--scheduler batch`)."""
    yield from serve_llama(tmp_path_factory, "batch")


def serve_llama(tmp_path_factory, scheduler: str, **limits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core machine
    root = tmp_path_factory.mktemp("llama")
    model_dir, prefixes = root / "tiny-llama", root / "prefixes"
    tok = tiny.tokenizer("decoder", CHAT_WORDS + WORDS, chat_template=CHAT_TEMPLATE, bos=True)
    config = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.2,  # wide logit margins: greedy never hangs on a float-rounding tie
    )
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(config).eval()
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for name, spec in PREFIXES.items():
        attach(base, tokenizer=tok, **spec).save_pretrained(prefixes / name)
    app = create_app(
        str(model_dir),
        prefixes,
        scheduler=scheduler,
        max_batch_size=8,
        max_wait_ms=20,
        max_body_bytes=16_384,
        max_prompt_tokens=24,
        max_tokens_limit=LIMIT,
        admin_token=TOKEN,
        reload_interval_s=0.3,
        request_timeout_s=30,
        body_timeout_s=1.5,
        **limits,
    )
    offline = Offline(model_dir, prefixes)
    try:
        with running(app, timeout_keep_alive=2, log_level="warning") as url:
            api, http = clients(url)
            srv = app.state.prefixtune
            yield {"api": api, "http": http, "srv": srv, "offline": offline, "url": url, "root": root,
                   "scheduler": scheduler}  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def name_of(model: str | None) -> str:
    return "tiny-llama" if model is None else model


def complete(api, model: str | None, prompt: str, max_tokens: int, **kw):
    return api.completions.create(model=name_of(model), prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def chat(api, model: str | None, content: str, max_tokens: int, **kw):
    messages = [{"role": "user", "content": content}]
    return api.chat.completions.create(
        model=name_of(model), messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )


# ------------------------------------------------------------------------------------- answers
def test_models_and_health(llama):
    ids = [m.id for m in llama["api"].models.list().data]
    assert ids == ["tiny-llama", "alpha", "beta", "delta", "flaky", "gamma"]
    health = llama["http"].get("/health").json()
    assert health["status"] == "ok" and health["prefixes"] == 5
    card = llama["http"].get("/v1/models/gamma").json()
    assert card["method"] == "prompt" and card["parent"] == "tiny-llama"


@pytest.mark.parametrize("model", ["alpha", "beta", "gamma", "delta", None])
def test_completion_and_chat_equal_offline_generate(llama, model):
    api, off = llama["api"], llama["offline"]
    for prompt in PROMPTS[:3]:
        out = complete(api, model, prompt, LIMIT)
        text, finish, n = off.answer(model, off.tok(prompt)["input_ids"], LIMIT)
        assert (out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens) == (text, finish, n)
        assert out.usage.prompt_tokens == len(off.tok(prompt)["input_ids"]) and out.model == name_of(model)
    reply = chat(api, model, PROMPTS[4], 7)
    text, finish, n = off.answer(model, off.chat_ids(PROMPTS[4]), 7)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (text, finish)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == n


def test_streaming_equals_the_whole_answer(llama):
    api, off = llama["api"], llama["offline"]
    for model in ("beta", "gamma", None):
        chunks = list(complete(api, model, PROMPTS[1], LIMIT, stream=True))
        text, finish, _ = off.answer(model, off.tok(PROMPTS[1])["input_ids"], LIMIT)
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == finish
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

        chunks = list(chat(api, model, PROMPTS[2], 9, stream=True, stream_options={"include_usage": True}))
        text, finish, n = off.answer(model, off.chat_ids(PROMPTS[2]), 9)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
        assert chunks[-1].usage.completion_tokens == n and not chunks[-1].choices


def test_streaming_is_incremental(llama, monkeypatch):
    """Tokens reach the client while generation is still running, not all at the end."""
    api, off, base = llama["api"], llama["offline"], llama["srv"].bank.base_model
    forward = base.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.04)
        return forward(*args, **kwargs)

    monkeypatch.setattr(base, "forward", slow_forward)
    arrivals, texts = [], []
    for chunk in complete(api, "beta", PROMPTS[1], LIMIT, stream=True):
        arrivals.append(time.monotonic())
        texts.append(chunk.choices[0].text)
    assert "".join(texts) == off.answer("beta", off.tok(PROMPTS[1])["input_ids"], LIMIT)[0]
    assert len(arrivals) >= 6 and arrivals[-1] - arrivals[0] > 0.2, arrivals


def test_stop_strings_n_and_prompt_lists(llama):
    api, off = llama["api"], llama["offline"]
    ids = off.tok(PROMPTS[0])["input_ids"]
    full, _, _ = off.answer("alpha", ids, LIMIT)
    stop = full.split()[2]  # a word the greedy answer contains
    expected = full[: full.index(stop)]
    out = complete(api, "alpha", PROMPTS[0], LIMIT, stop=[stop, "zzz"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    streamed = list(complete(api, "alpha", PROMPTS[0], LIMIT, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"

    greedy = complete(api, "beta", PROMPTS[3], 6, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2] and len({c.text for c in greedy.choices}) == 1
    sampled = api.completions.create(model="beta", prompt=PROMPTS[3], max_tokens=6, n=2, temperature=1.5, top_p=0.9)
    assert len(sampled.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in sampled.choices)
    assert sampled.usage.completion_tokens <= 12

    both = complete(api, "gamma", [PROMPTS[5], PROMPTS[6]], 5, n=2)
    for i, prompt in enumerate([PROMPTS[5], PROMPTS[5], PROMPTS[6], PROMPTS[6]]):
        assert both.choices[i].text == off.answer("gamma", off.tok(prompt)["input_ids"], 5)[0]


# ------------------------------------------------------------------------------------- errors and limits
def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]


def test_error_statuses(llama):
    api, http = llama["api"], llama["http"]
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        complete(api, "nope", "the cat", 4)
    with pytest.raises(openai.NotFoundError):
        chat(api, "../alpha", "the cat", 4)

    bad = http.post(
        "/v1/completions", content=b'{"model": "alpha", "prompt": ', headers={"content-type": "application/json"}
    )
    assert bad.status_code == 422 and error_of(bad)["type"] == "invalid_request_error"
    wrong = http.post("/v1/completions", json={"model": "alpha", "prompt": "the", "max_tokens": "many"})
    assert wrong.status_code == 422 and "max_tokens" in error_of(wrong)["message"]
    unknown = http.post("/v1/completions", json={"model": "alpha", "prompt": "the", "seed": 3})
    assert unknown.status_code == 422 and "seed" in error_of(unknown)["message"]
    unsupported = http.post("/v1/completions", json={"model": "alpha", "prompt": "the", "presence_penalty": 0.5})
    assert unsupported.status_code == 422 and "presence_penalty" in error_of(unsupported)["message"]
    defaults = {"temperature": None, "n": None, "stop": None, "presence_penalty": 0, "logprobs": None, "echo": False}
    accepted = http.post("/v1/completions", json={"model": "alpha", "prompt": "the", "max_tokens": 2, **defaults})
    assert accepted.status_code == 200, accepted.text
    with pytest.raises(openai.UnprocessableEntityError):
        api.chat.completions.create(model="alpha", messages=[{"role": "robot", "content": "hi"}])

    huge = {"model": "alpha", "prompt": "the " * 5000}
    declared = http.post("/v1/completions", json=huge)
    assert declared.status_code == 413 and error_of(declared)["code"] == "request_too_large"

    def chunked():
        for _ in range(40):
            yield b"x" * 1000

    streamed = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    with pytest.raises(openai.APIStatusError) as info:
        complete(api, "alpha", "the " * 5000, 4)
    assert info.value.status_code == 413

    with pytest.raises(openai.BadRequestError, match="the prompt has 31 tokens; the limit is 24"):
        complete(api, "alpha", "the " * 30, 4)
    with pytest.raises(openai.BadRequestError, match="max_tokens=13 is above this server's limit of 12"):
        complete(api, "alpha", "the cat", LIMIT + 1)
    with pytest.raises(openai.BadRequestError, match="needs 12 batch rows"):
        api.completions.create(model="alpha", prompt=["a", "b", "c"], max_tokens=2, n=4, temperature=1)
    with pytest.raises(openai.BadRequestError, match="= 41 exceeds the model.s 40 positions"):
        complete(api, "beta", "the " * 23, LIMIT)  # 24 + 5 prefix positions + 12 > 40
    assert http.get("/no/such/route").status_code == 404
    assert complete(api, "alpha", "the cat", 2).choices[0].finish_reason  # still serving


# ------------------------------------------------------------------------------------- load
@pytest.mark.parametrize("server", ["llama", "llama_batch"])
def test_load_200_requests_16_clients_all_equal_offline(server, request):
    """Mixed prefixes, mixed max_tokens and, under the continuous scheduler, rows joining mid-stream."""
    llama = request.getfixturevalue(server)
    api, off, srv = llama["api"], llama["offline"], llama["srv"]
    rng = random.Random(0)
    names = ["alpha", "beta", "gamma", "delta", None]
    jobs = [(rng.choice(names), rng.choice(PROMPTS), rng.randint(3, LIMIT), rng.random() < 0.3) for _ in range(200)]
    for name, prompt, _, _ in jobs:  # expected answers first, so the load is all server
        off.tokens(name, off.tok(prompt)["input_ids"])
        off.tokens(name, off.chat_ids(prompt))
    before = dict(srv.batcher.stats)

    def one(job):
        name, prompt, max_tokens, is_chat = job
        if is_chat:
            r = chat(api, name, prompt, max_tokens)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        r = complete(api, name, prompt, max_tokens)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, jobs))
    elapsed = time.monotonic() - start
    for (name, prompt, max_tokens, is_chat), got in zip(jobs, answers, strict=True):
        ids = off.chat_ids(prompt) if is_chat else off.tok(prompt)["input_ids"]
        assert got == off.answer(name, ids, max_tokens), (name, prompt, max_tokens, is_chat)
    stats = srv.batcher.stats
    keys = ("requests", "batches", "rows", "steps", "joined_running", "rode", "decode_steps", "row_steps",
            "prefill_rows")  # fmt: skip
    grew = {k: stats[k] - before.get(k, 0) for k in keys}
    assert grew["requests"] == 200 and stats.get("failed", 0) == before.get("failed", 0), grew
    tokens = sum(got[2] for got in answers)  # each came from a row of a forward: a step's or a prefill's
    if llama["scheduler"] == "batch":
        assert grew["rows"] == 200 and grew["batches"] < 150, grew  # requests really shared batches
        assert grew["batches"] * LIMIT >= grew["decode_steps"] >= max(got[2] for got in answers), grew
        assert grew["row_steps"] > tokens, (grew, tokens)  # finished rows step on in `generate`
    else:  # steps were shared, and rows joined batches that were already decoding, their prompts fed in its steps
        assert grew["rows"] > 1.5 * grew["steps"] and grew["joined_running"] > 20 and stats["max_rows"] > 4, grew
        assert grew["rode"] > 20, grew
        assert tokens <= grew["rows"] + grew["prefill_rows"] <= tokens + 200, (grew, tokens)  # + a last EOS each
    print(f"200 requests in {elapsed:.1f} s: {grew}")


# ------------------------------------------------------------------------------------- hot-loading and admin
def saved_prefix(off: Offline, folder: Path, seed: int) -> Path:
    attach(off.base, num_virtual_tokens=3, init="random", seed=seed).save_pretrained(folder)
    return folder


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_hot_loading_from_the_folder(llama):
    api, off, root = llama["api"], llama["offline"], llama["root"]
    prefixes = root / "prefixes"
    staged = saved_prefix(off, root / "staging" / "epsilon", seed=11)
    shutil.move(staged, prefixes / "epsilon")  # a request naming it right away loads it
    out = complete(api, "epsilon", PROMPTS[0], LIMIT)
    expected = PrefixModel.from_pretrained(off.base, prefixes / "epsilon")
    off.members["epsilon"] = expected
    assert out.choices[0].text == off.answer("epsilon", off.tok(PROMPTS[0])["input_ids"], LIMIT)[0]

    shutil.move(saved_prefix(off, root / "staging" / "zeta", seed=12), prefixes / "zeta")
    wait_for(lambda: "zeta" in [m.id for m in api.models.list().data])  # found by the poller alone
    shutil.rmtree(prefixes / "zeta")
    wait_for(lambda: "zeta" not in [m.id for m in api.models.list().data])
    with pytest.raises(openai.NotFoundError):
        complete(api, "zeta", "the", 2)

    (prefixes / "broken").mkdir()
    (prefixes / "broken" / "prefixtune_config.json").write_text("{not json")
    with pytest.raises(openai.NotFoundError, match="failed to load"):
        complete(api, "broken", "the", 2)
    shutil.rmtree(prefixes / "broken")


def test_admin_upload_and_delete(llama, monkeypatch):
    http, api, off, root = llama["http"], llama["api"], llama["offline"], llama["root"]
    folder = saved_prefix(off, root / "staging" / "eta", seed=13)
    body = {
        "config": json.loads((folder / "prefixtune_config.json").read_text()),
        "weights": base64.b64encode((folder / "prefixtune_model.safetensors").read_bytes()).decode(),
    }
    auth = {"Authorization": f"Bearer {TOKEN}"}
    calls = []
    import prefixtune.serving.guards as server_module

    real = server_module.hmac.compare_digest
    monkeypatch.setattr(server_module.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))

    assert http.post("/admin/prefixes/eta", json=body).status_code == 401
    refused = http.post("/admin/prefixes/eta", json=body, headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 403 and error_of(refused)["type"] == "permission_error"
    assert calls, "the token must be compared with hmac.compare_digest"
    assert "eta" not in [m.id for m in api.models.list().data]

    created = http.post("/admin/prefixes/eta", json=body, headers=auth)
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "eta" and (root / "prefixes" / "eta" / "prefixtune_model.safetensors").is_file()
    off.members["eta"] = PrefixModel.from_pretrained(off.base, folder)
    out = complete(api, "eta", PROMPTS[2], LIMIT)
    assert out.choices[0].text == off.answer("eta", off.tok(PROMPTS[2])["input_ids"], LIMIT)[0]
    assert http.post("/admin/prefixes/eta", json=body, headers=auth).status_code == 409
    assert http.post("/admin/prefixes/eta?replace=true", json=body, headers=auth).status_code == 201

    garbage = dict(body, weights=base64.b64encode(b"not safetensors").decode())
    invalid = http.post("/admin/prefixes/theta", json=garbage, headers=auth)
    assert invalid.status_code == 400 and "theta" not in [m.id for m in api.models.list().data]
    assert not (root / "prefixes" / "theta").exists()
    assert http.post("/admin/prefixes/bad.name", json=body, headers=auth).status_code == 400
    assert [p.name for p in (root / "prefixes").iterdir() if p.name.startswith(".")] == []

    assert http.delete("/admin/prefixes/eta", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert http.delete("/admin/prefixes/eta", headers=auth).json()["deleted"] is True
    assert not (root / "prefixes" / "eta").exists()
    with pytest.raises(openai.NotFoundError):
        complete(api, "eta", "the", 2)
    assert http.delete("/admin/prefixes/eta", headers=auth).status_code == 404


# ------------------------------------------------------------------------------------- reliability
def gated(srv):
    """Hold the worker thread until the returned event is set, so requests pile up into one batch."""
    gate = threading.Event()
    srv.batcher.run_in_worker(gate.wait)
    return gate


@pytest.mark.parametrize("server", ["llama", "llama_batch"])
def test_failure_in_one_request_spares_the_rest_of_its_batch(server, request, monkeypatch):
    llama = request.getfixturevalue(server)
    api, off, srv = llama["api"], llama["offline"], llama["srv"]

    def broken():
        raise RuntimeError("injected failure")

    # A freshly loaded copy: the continuous scheduler computes a prefix's keys/values once per loaded prefix.
    srv.batcher.run_in_worker(lambda: srv.bank.add("flaky", llama["root"] / "prefixes" / "flaky")).result()
    monkeypatch.setattr(srv.bank["flaky"], "prefix_kv", broken)  # the test hook: this prefix fails to compute
    reruns, failed = srv.batcher.stats["reruns"], srv.batcher.stats["failed"]
    jobs = [
        ("flaky", PROMPTS[0]),
        ("alpha", PROMPTS[1]),
        (None, PROMPTS[2]),
        ("flaky", PROMPTS[3]),
        ("gamma", PROMPTS[4]),
        ("delta", PROMPTS[5]),
    ]
    gate = gated(srv)

    def one(job):
        try:
            return complete(api, job[0], job[1], LIMIT).choices[0].text
        except openai.InternalServerError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        wait_for(lambda: srv.batcher.pending() == len(jobs))
        gate.set()
        results = [f.result() for f in futures]
    if llama["scheduler"] == "batch":
        assert srv.batcher.stats["reruns"] == reruns + 1  # they shared one batch, which failed and was split
    assert srv.batcher.stats["failed"] == failed + 2  # the two flaky requests, and no other
    for (name, prompt), got in zip(jobs, results, strict=True):
        if name == "flaky":
            assert isinstance(got, openai.InternalServerError) and got.status_code == 500
            assert "injected failure" in got.body["message"]
        else:
            assert got == off.answer(name, off.tok(prompt)["input_ids"], LIMIT)[0]
    with pytest.raises(openai.InternalServerError):
        list(complete(api, "flaky", PROMPTS[0], 4, stream=True))
    assert llama["http"].get("/health").json()["status"] == "ok"
    assert complete(api, "alpha", PROMPTS[1], 3).choices[0].text  # the server keeps serving


def test_disconnected_clients_are_dropped_and_idle_connections_closed(llama):
    srv, url = llama["srv"], llama["url"]
    cancelled = srv.batcher.stats["cancelled"]
    gate = gated(srv)
    body = {"model": "alpha", "prompt": "the cat", "max_tokens": LIMIT, "temperature": 0}
    for stream in (True, False):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{url}/v1/completions", json=dict(body, stream=stream), timeout=httpx.Timeout(5, read=0.5))
    time.sleep(0.3)
    gate.set()
    wait_for(lambda: srv.batcher.stats["cancelled"] == cancelled + 2)  # dropped, never generated

    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(dict(body, stream=True)).encode()
    deaf = socket.create_connection((host, int(port)))  # streams, but never reads its answer
    deaf.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    assert complete(llama["api"], "gamma", PROMPTS[0], LIMIT).choices[0].text  # others are served meanwhile
    deaf.close()

    idle, half, slow = (socket.create_connection((host, int(port))) for _ in range(3))
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    slow.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"model":'
    )
    for sock in (idle, half, slow):
        sock.settimeout(6)
    assert b" 408 " in slow.recv(4096).split(b"\r\n")[0]  # body not sent within body_timeout_s
    assert idle.recv(1) == b"" and half.recv(1) == b""  # closed by the server, not left open
    for sock in (idle, half, slow):
        sock.close()


# ------------------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bert")
    tok = tiny.tokenizer("encoder", CHAT_WORDS + WORDS)
    assert len(tok) <= tiny.VOCAB
    base = tiny.make("bert", task="classification")
    base.config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    base.config.label2id = {v: k for k, v in base.config.id2label.items()}
    base.save_pretrained(root / "tiny-bert")
    tok.save_pretrained(root / "tiny-bert")
    for name, spec in {
        "sentiment": {"method": "prefix", "num_virtual_tokens": 3, "seed": 1},
        "topic": {"method": "prompt", "num_virtual_tokens": 2, "seed": 2},
    }.items():
        member = attach(base, init="random", **spec)
        with torch.no_grad():
            for p in member.heads.parameters():
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
        member.save_pretrained(root / "prefixes" / name)
    app = create_app(str(root / "tiny-bert"), root / "prefixes", max_wait_ms=20, reload_interval_s=None)
    with running(app, log_level="warning") as url:
        yield {"url": url, "root": root, "tok": tok}
    torch.set_num_threads(threads)


def test_classify_equals_offline_and_reports_labels(bert):
    root, tok = bert["root"], bert["tok"]
    base = tf.AutoModelForSequenceClassification.from_pretrained(root / "tiny-bert").eval()
    members = {n: PrefixModel.from_pretrained(base, root / "prefixes" / n) for n in ("sentiment", "topic")}
    texts = ["a good film", "the sad old movie on a cold night", "bad"]
    http = httpx.Client(base_url=bert["url"], timeout=30)

    def ask(model):
        r = http.post("/v1/classify", json={"model": model, "input": texts})
        assert r.status_code == 200, r.text
        return r.json()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # together: one mixed batch
        answers = dict(
            zip(["sentiment", "topic", "tiny-bert"], pool.map(ask, ["sentiment", "topic", "tiny-bert"]), strict=True)
        )
    for name, answer in answers.items():
        model = members.get(name, base)
        for row, text in zip(answer["data"], texts, strict=True):
            with torch.no_grad():
                probs = model(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
            expected = dict(zip(["negative", "neutral", "positive"], probs.tolist(), strict=True))
            assert row["probabilities"].keys() == expected.keys()
            torch.testing.assert_close(list(row["probabilities"].values()), list(expected.values()), atol=1e-5, rtol=0)
            assert row["label"] == max(expected, key=expected.get)
    single = http.post("/v1/classify", json={"model": "sentiment", "input": "good"}).json()
    assert len(single["data"]) == 1 and single["usage"]["prompt_tokens"] == 3

    not_generative = http.post("/v1/completions", json={"model": "sentiment", "prompt": "good"})
    assert not_generative.status_code == 400 and "/v1/classify" in error_of(not_generative)["message"]
    disabled = http.delete("/admin/prefixes/sentiment", headers={"Authorization": "Bearer x"})
    assert disabled.status_code == 403 and "disabled" in error_of(disabled)["message"]
    assert http.post("/v1/classify", json={"model": "nope", "input": "good"}).status_code == 404


def test_prefixes_load_on_demand_within_a_bound(tmp_path_factory):
    """With --max-loaded-prefixes, folders are registered at start, loaded when asked for, and the least
    recently used is dropped beyond the bound; answers stay those of the prefix alone."""
    server = serve_llama(tmp_path_factory, "continuous", max_loaded_prefixes=2)
    llama = next(server)
    try:
        api, off, srv = llama["api"], llama["offline"], llama["srv"]
        assert srv.bank.names() == []  # nothing loaded yet
        assert [m.id for m in api.models.list().data] == ["tiny-llama", "alpha", "beta", "delta", "flaky", "gamma"]
        for name in ["alpha", "beta", "gamma", "delta", "alpha", "beta"]:
            ids = off.tok(PROMPTS[1])["input_ids"]
            assert complete(api, name, PROMPTS[1], LIMIT).choices[0].text == off.answer(name, ids, LIMIT)[0]
            assert name in srv.bank and len(srv.bank.names()) <= 2
        assert sorted(srv.bank.names()) == ["alpha", "beta"]
    finally:
        server.close()


def test_a_raw_text_prefix_served_through_chat_is_warned_about_once(llama, caplog):
    """A prefix whose training record says raw text gets a warning on the chat endpoint; a chat-trained one none."""
    folder = llama["root"] / "prefixes" / "alpha"
    record = folder / "prefixtune_train.json"
    try:
        for fmt, warned in (("messages", False), ("text", True)):
            record.write_text(json.dumps({"data_format": fmt}))
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="prefixtune.server"):
                chat(llama["api"], "alpha", PROMPTS[0], 3)
                chat(llama["api"], "alpha", PROMPTS[1], 3)
                complete(llama["api"], "alpha", PROMPTS[0], 3)
            said = [r.getMessage() for r in caplog.records if "trained on raw text" in r.getMessage()]
            assert said == (["prefix 'alpha' was trained on raw text (text), not chat: the chat template is new to it"]
                            if warned else [])  # fmt: skip
    finally:
        record.unlink(missing_ok=True)
