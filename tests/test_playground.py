"""The playground (/playground) in a real browser: headless Chromium, driven by Playwright, against a live server
on the tiny models of test_server.py.

What the page shows must be what the API answers for the same request: streamed answers, label probabilities,
the server's own error messages. The admin token may travel only with admin calls, and whatever the server says
is shown as text. The page's read-only endpoints (a prefix's card and curves) are checked over plain HTTP, so
those tests run without a browser too.

The screenshot in docs/playground.png comes from `test_page_compares_prefixes_side_by_side`; it is written when
missing or when PREFIXTUNE_UPDATE_SCREENSHOT=1, so a test run does not rewrite a committed file.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
import test_server  # skips this module, like that one, without openai, httpx, uvicorn or fastapi
from safetensors import safe_open
from test_server import LIMIT, PREFIXES, TOKEN, error_of, serve_llama, wait_for

from prefixtune import attach
from prefixtune.serving import prefix_card
from prefixtune.train import run_log

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser tests skip, saying why
    expect = sync_playwright = None

httpx = test_server.httpx

REPO = Path(__file__).resolve().parents[1]
PAGE_DIR = REPO / "src" / "prefixtune" / "serving" / "playground"
SCREENSHOT = REPO / "docs" / "playground.png"
PROMPT = "the cat sat on"
TEST_METRICS = {"loss": 2.25, "accuracy": 0.7125, "rows": 80, "note": "not a number, not shown"}

bert = test_server.bert  # the tiny BERT classifier and its two prefixes, served without an admin token


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """test_server's tiny Llama with five prefixes and an admin token; alpha also has what a training run
    leaves beside a prefix: curves.png and test_metrics.json."""
    for served in serve_llama(tmp_path_factory, "continuous"):
        alpha = served["root"] / "prefixes" / "alpha"
        steps = [{"split": "train", "step": s, "loss": 3 - s / 8} for s in range(1, 17)]
        evals = [{"split": "eval", "step": s, "loss": 2.9 - s / 10, "accuracy": 0.4 + s / 50} for s in (8, 16)]
        run_log.plot_curves(steps + evals, alpha / run_log.CURVES)
        (alpha / "test_metrics.json").write_text(json.dumps(TEST_METRICS))
        yield served


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("no chromium on PATH: `apt-get install chromium` (what .ci/run does as root) runs these tests")
    if sync_playwright is None:
        pytest.skip("playwright is not installed: `pip install -e '.[test]'` installs it")
    expect.set_options(timeout=20_000)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


def open_page(browser, url: str, *hooks):
    """A fresh page on the playground; `hooks` are (event, handler) pairs attached before it loads."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    for event, handler in hooks:
        page.on(event, handler)
    page.goto(f"{url}/playground")
    return page


def card_of(page, name: str):
    return page.locator(f'#cards .card[data-model="{name}"]')


def choose(page, names: list[str]) -> None:
    """Tick exactly `names` in the model list (unticking first: at most four may be ticked)."""
    boxes = page.locator("#model-list input")
    expect(boxes.first).to_be_visible()
    values = [box.get_attribute("value") for box in boxes.all()]
    assert set(names) <= set(values), values
    for value in values:
        if value not in names:
            page.locator(f'#model-list input[value="{value}"]').set_checked(False)
    for value in names:
        page.locator(f'#model-list input[value="{value}"]').set_checked(True)
    expect(page.locator("#cards .card")).to_have_count(len(names))


def run_and_wait(page, names: list[str], state: str = "done") -> None:
    page.click("#run")
    for name in names:
        expect(card_of(page, name)).to_have_attribute("data-state", state)


def api_answer(http, path: str, body: dict) -> str:
    out = http.post(path, json=body)
    assert out.status_code == 200, out.text
    choice = out.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def screenshot(page) -> None:
    png = page.screenshot(full_page=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    if os.environ.get("PREFIXTUNE_UPDATE_SCREENSHOT") or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(png)


# ------------------------------------------------------------------------------------- over plain HTTP
def test_page_files_are_served_and_shipped(llama):
    http = llama["http"]
    root = http.get("/")
    assert root.status_code == 307 and root.headers["location"] == "playground"
    page = http.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name, kind in (("index.html", "text/html"), ("app.js", "text/javascript"), ("style.css", "text/css")):
        got = http.get("/playground" if name == "index.html" else f"/playground/{name}")
        assert got.headers["content-type"].startswith(kind) and got.content == (PAGE_DIR / name).read_bytes()
        assert got.headers["x-content-type-options"] == "nosniff"
    assert http.get("/playground/routes.py").status_code == 404
    assert http.get("/playground/settings").json() == {
        "model": "tiny-llama",
        "task": "causal_lm",
        "chat": True,
        "admin": True,
        "max_tokens_limit": LIMIT,
        "max_upload_bytes": 64 << 20,
    }
    # a wheel ships what the package data names: every file of the page must match it
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = shipped["prefixtune.serving"]
    for file in PAGE_DIR.iterdir():
        assert any(fnmatch.fnmatch(f"playground/{file.name}", p) for p in patterns), file.name


def test_readme_shows_the_screenshot():
    assert "![playground](docs/playground.png)" in (REPO / "README.md").read_text()
    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_card_reads_the_prefix_folder(llama):
    http, root = llama["http"], llama["root"] / "prefixes"
    base = llama["offline"].base
    assert prefix_card.CURVES == run_log.CURVES
    card = http.get("/v1/models/alpha/card")
    assert card.status_code == 200, card.text
    with safe_open(root / "alpha" / "prefixtune_model.safetensors", "pt") as saved:
        size = sum(math.prod(saved.get_slice(k).get_shape()) for k in saved.keys())
    assert size == attach(base, **PREFIXES["alpha"]).trainable_parameters()["trainable"]
    assert card.json() == {
        "id": "alpha",
        "task": "causal_lm",
        "method": "prefix",
        "num_virtual_tokens": 2,
        "reparam": None,
        "base_model": None,
        "architecture": "LlamaForCausalLM",
        "trainable_parameters": size,
        "dataset": None,
        "test_metrics": {"loss": 2.25, "accuracy": 0.7125, "rows": 80},
        "validation": {},
        "curves": True,
    }
    curves = http.get("/v1/models/alpha/curves.png")
    assert curves.headers["content-type"] == "image/png"
    assert curves.content == (root / "alpha" / "curves.png").read_bytes()

    gamma = http.get("/v1/models/gamma/card").json()
    assert {k: gamma[k] for k in ("method", "num_virtual_tokens", "curves", "test_metrics")} == {
        "method": "prompt",
        "num_virtual_tokens": 3,
        "curves": False,  # its run left neither curves nor test metrics
        "test_metrics": {},
    }
    assert http.get("/v1/models/delta/card").json()["trainable_parameters"] == 0  # a fixed text trains nothing
    missing = http.get("/v1/models/gamma/curves.png")
    assert missing.status_code == 404 and "no training curves" in error_of(missing)["message"]


def test_card_reads_stay_inside_the_prefix_folder(llama, tmp_path):
    http, root = llama["http"], llama["root"] / "prefixes"
    for name in ("..", ".hidden", "nope", "tiny-llama", "alpha.json"):
        for what in ("card", "curves.png"):
            got = http.get(f"/v1/models/{quote(name, safe='').replace('.', '%2E')}/{what}")  # reaches the route
            assert got.status_code == 404, (name, what)
            assert error_of(got)["message"] == f"unknown prefix {name!r}: see /v1/models for the served ones"
    for path in ("/v1/models/..%2F..%2Fetc/card", "/v1/models/%2E%2E%2Fprefixes%2Falpha/curves.png"):
        assert http.get(path).status_code == 404

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not for the web")
    link = root / "gamma" / "curves.png"
    link.symlink_to(secret)
    try:
        for what in ("card", "curves.png"):
            refused = http.get(f"/v1/models/gamma/{what}")
            assert refused.status_code == 403 and b"not for the web" not in refused.content
            assert error_of(refused)["message"] == "curves.png of prefix 'gamma' leads outside its folder"
    finally:
        link.unlink()
    assert http.get("/v1/models/gamma/card").status_code == 200

    # the app-wide body guard stands in front of the new routes too
    big = http.request("GET", "/v1/models/alpha/card", content=b"x" * 20_000)
    assert big.status_code == 413 and error_of(big)["code"] == "request_too_large"


# ------------------------------------------------------------------------------------- in the browser
def test_page_compares_prefixes_side_by_side(llama, browser):
    http = llama["http"]
    page = open_page(browser, llama["url"])
    try:
        expect(page.locator("#base-model")).to_have_text("tiny-llama")
        expect(page.locator("#admin")).to_be_visible()
        names = ["tiny-llama", "alpha", "beta"]
        choose(page, names)
        page.fill("#prompt", PROMPT)
        page.fill("#temperature", "0")
        page.fill("#max-tokens", str(LIMIT))
        run_and_wait(page, names)
        answers = {}
        for name in names:
            body = {"model": name, "prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0}
            answers[name] = api_answer(http, "/v1/completions", body)
            assert card_of(page, name).locator(".answer").text_content() == answers[name], name
            expect(card_of(page, name).locator(".status")).to_contain_text("finished:")
        assert len(set(answers.values())) == 3, answers  # each card asked its own model

        alpha = card_of(page, "alpha")
        expect(alpha.locator('dd[data-field="method"]')).to_have_text("prefix")
        expect(alpha.locator('dd[data-field="num_virtual_tokens"]')).to_have_text("2 virtual tokens")
        params = attach(llama["offline"].base, **PREFIXES["alpha"]).trainable_parameters()["trainable"]
        expect(alpha.locator('dd[data-field="trainable_parameters"]')).to_have_text(f"{params:,}")
        expect(alpha.locator('dd[data-field="base_model"]')).to_have_text("LlamaForCausalLM")
        expect(alpha.locator(".metrics")).to_contain_text("accuracy0.7125")
        expect(alpha.locator(".metrics")).not_to_contain_text("note")
        expect(alpha.locator("img.curves")).to_be_visible()
        assert alpha.locator("img.curves").evaluate("img => img.complete && img.naturalWidth") > 100
        expect(card_of(page, "beta").locator("img.curves")).to_be_hidden()  # beta's run left no curves
        expect(card_of(page, "tiny-llama").locator('dd[data-field="kind"]')).to_have_text("bare model, no prefix")
        screenshot(page)

        # a chat turn with a stop string: the controls reach the request
        page.select_option("#mode", "chat")
        expect(page.locator("#system")).to_be_visible()
        chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": LIMIT, "temperature": 0}
        full = api_answer(http, "/v1/chat/completions", {"model": "alpha", **chat})
        stop = full.split()[2]
        page.fill("#stop", stop)
        run_and_wait(page, names)
        for name in names:
            expected = api_answer(http, "/v1/chat/completions", {"model": name, **chat, "stop": [stop]})
            assert card_of(page, name).locator(".answer").text_content() == expected, name
        assert card_of(page, "alpha").locator(".answer").text_content() == full[: full.index(stop)]
        expect(card_of(page, "alpha").locator(".status")).to_contain_text("finished: stop")
    finally:
        page.close()


def test_an_unknown_prefix_shows_the_servers_error(llama, browser):
    http = llama["http"]
    doomed = llama["root"] / "prefixes" / "doomed"
    attach(llama["offline"].base, num_virtual_tokens=3, init="random", seed=21).save_pretrained(doomed)
    wait_for(lambda: "doomed" in [m["id"] for m in http.get("/v1/models").json()["data"]])
    page = open_page(browser, llama["url"])
    try:
        choose(page, ["alpha", "doomed"])
        expect(card_of(page, "doomed").locator('dd[data-field="method"]')).to_have_text("prefix")
        shutil.rmtree(doomed)  # gone between the listing and the question
        wait_for(lambda: "doomed" not in [m["id"] for m in http.get("/v1/models").json()["data"]])
        page.fill("#prompt", PROMPT)
        page.click("#run")
        expect(card_of(page, "doomed")).to_have_attribute("data-state", "error")
        expect(card_of(page, "alpha")).to_have_attribute("data-state", "done")
        refused = http.post("/v1/completions", json={"model": "doomed", "prompt": PROMPT, "max_tokens": 4})
        assert refused.status_code == 404
        message = error_of(refused)["message"]
        assert message.startswith("unknown model 'doomed'")
        expect(card_of(page, "doomed").locator(".card-error")).to_have_text(message)
        expect(card_of(page, "doomed").locator(".answer")).to_have_text("")
    finally:
        page.close()


def test_admin_token_travels_only_with_admin_calls(llama, browser, tmp_path):
    http, root = llama["http"], llama["root"] / "prefixes"
    folder = tmp_path / "upload"
    attach(llama["offline"].base, num_virtual_tokens=3, init="random", seed=22).save_pretrained(folder)
    requests, dialogs = [], []

    def accept(dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page = open_page(browser, llama["url"], ("request", lambda request: requests.append(request)), ("dialog", accept))
    try:
        page.click("#admin summary")
        page.fill("#admin-token", TOKEN)
        choose(page, ["alpha", "gamma"])  # with the token typed in, the page still asks without it
        page.fill("#prompt", PROMPT)
        run_and_wait(page, ["alpha", "gamma"])

        page.set_input_files("#upload-config", folder / "prefixtune_config.json")
        page.set_input_files("#upload-weights", folder / "prefixtune_model.safetensors")
        hostile = "<img src=x onerror=alert(1)>"
        page.fill("#upload-name", hostile)
        page.click("#upload")
        refused = http.post(f"/admin/prefixes/{quote(hostile, safe='')}", json={"config": {}, "weights": ""},
                            headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert refused.status_code == 400
        expect(page.locator("#admin-status")).to_have_text(error_of(refused)["message"])  # shown as text
        assert page.locator("#admin-status img").count() == 0

        page.fill("#upload-name", "uploaded")
        page.click("#upload")
        expect(page.locator("#admin-status")).to_have_text("uploaded uploaded")
        expect(page.locator('#model-list input[value="uploaded"]')).to_be_visible()
        assert (root / "uploaded" / "prefixtune_model.safetensors").read_bytes() == (
            folder / "prefixtune_model.safetensors"
        ).read_bytes()

        page.select_option("#delete-name", "uploaded")
        page.click("#delete")
        expect(page.locator("#admin-status")).to_have_text("deleted uploaded")
        expect(page.locator('#model-list input[value="uploaded"]')).to_have_count(0)
        assert not (root / "uploaded").exists()
        assert dialogs == ["Delete the prefix uploaded from the server's folder?"]  # and no alert ran

        admin, other = [], []
        for request in requests:
            is_admin = urlparse(request.url).path.startswith("/admin/")
            (admin if is_admin else other).append(request)
            expected = f"Bearer {TOKEN}" if is_admin else None
            assert request.all_headers().get("authorization") == expected, request.url
            assert TOKEN not in request.url and TOKEN not in (request.post_data or "")
        assert [(r.method, urlparse(r.url).path) for r in admin] == [
            ("POST", "/admin/prefixes/" + quote(hostile, safe="()")),
            ("POST", "/admin/prefixes/uploaded"),
            ("DELETE", "/admin/prefixes/uploaded"),
        ]
        paths = {urlparse(r.url).path for r in other}
        assert {"/v1/models", "/v1/completions", "/v1/models/alpha/card", "/playground/settings"} <= paths
    finally:
        page.close()


def test_a_classifier_shows_its_label_probabilities_as_bars(bert, browser):
    http = httpx.Client(base_url=bert["url"], timeout=30)
    page = open_page(browser, bert["url"])
    try:
        expect(page.locator("#base-model")).to_have_text("tiny-bert")
        expect(page.locator("#run")).to_have_text("Classify")
        expect(page.locator("#mode")).to_be_hidden()
        expect(page.locator("#admin")).to_be_hidden()  # no admin token on this server
        names = ["tiny-bert", "sentiment", "topic"]
        choose(page, names)
        text = "the sad old movie on a cold night"
        page.fill("#prompt", text)
        run_and_wait(page, names)
        for name in names:
            answer = http.post("/v1/classify", json={"model": name, "input": text}).json()["data"][0]
            bars = card_of(page, name).locator(".bar")
            expect(bars).to_have_count(3)
            shown = {
                bar.get_attribute("data-label"): float(bar.get_attribute("data-probability")) for bar in bars.all()
            }
            # the page's three requests shared a padded batch: float32 noise, as in test_server's classify test
            assert shown == pytest.approx(answer["probabilities"], abs=1e-5, rel=0), name
            for bar in bars.all():
                percent = float(bar.locator(".value").text_content().rstrip("%"))
                assert abs(percent - 100 * shown[bar.get_attribute("data-label")]) <= 0.05 + 1e-9
                width = bar.locator(".fill").evaluate("e => e.getBoundingClientRect().width")
                track = bar.locator(".track").evaluate("e => e.getBoundingClientRect().width")
                assert abs(width / track - shown[bar.get_attribute("data-label")]) < 0.01
            expect(card_of(page, name).locator(".bar.best")).to_have_attribute("data-label", answer["label"])
        expect(card_of(page, "sentiment").locator('dd[data-field="method"]')).to_have_text("prefix")
    finally:
        page.close()
        http.close()
