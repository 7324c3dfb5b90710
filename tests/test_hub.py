"""The Hugging Face Hub without the network: downloads from a pre-filled hub cache in offline mode, uploads
through a recorded `HfApi`, the model card, `prefixtune train --push-to-hub` and `serve --prefixes user/repo`.

The cache is laid out the way huggingface_hub writes it (models--user--name/{refs,snapshots,blobs}, the
snapshot's files linked to content-addressed blobs), so `snapshot_download` itself finds it, offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import tiny
import torch
import yaml
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import filter_repo_objects

from prefixtune import PrefixModel, attach, cli, hub, model_card, serialization, tasks
from prefixtune.collection import PrefixCollection
from prefixtune.errors import PrefixTuneError
from prefixtune.serving.prefix_folder import PrefixFolder, parse_sources
from prefixtune.train import run_log

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def saved_prefix(folder: Path, seed: int = 0) -> Path:
    attach(tiny.make("llama"), num_virtual_tokens=3, init="random", seed=seed).save_pretrained(folder)
    return folder


def fill_cache(cache: Path, repo_id: str, files: Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `files` into a hub cache as `repo_id` at `commit`, reachable from `refs` (huggingface_hub's layout)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline; huggingface_hub read both settings at import, so its constants change too."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def logits(model, ids=((5, 9, 14, 2, 7),)) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


# ------------------------------------------------------------------------------------- download
def test_resolve_finds_a_cached_prefix_offline_and_it_loads_exactly(tmp_path, offline_cache, monkeypatch):
    asked = []
    download = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: (asked.append(k), download(*a, **k))[1])
    original = saved_prefix(tmp_path / "original")
    fill_cache(offline_cache, "user/name", original)
    folder = hub.resolve("user/name")
    patterns = asked[0]["allow_patterns"]  # what a download with the network would fetch: prefix files only
    expected = ["prefixtune_config.json", "prefixtune_model.safetensors", "prefixtune_train.json", "README.md",
                "adapter_config.json", "adapter_model.safetensors"]  # fmt: skip
    assert sorted(patterns) == sorted(expected)
    assert not any(p.endswith(serialization.PICKLE_SUFFIXES) for p in patterns)
    assert folder.is_relative_to(offline_cache) and (folder / serialization.WEIGHTS_NAME).is_file()
    downloaded = PrefixModel.from_pretrained(tiny.make("llama"), folder)
    saved = PrefixModel.from_pretrained(tiny.make("llama"), original)
    assert torch.equal(logits(downloaded), logits(saved))
    assert not torch.equal(logits(downloaded), logits(tiny.make("llama")))  # the prefix does act
    assert hub.resolve("user/name", revision=COMMIT) == folder  # a commit hash names the same snapshot
    assert hub.resolve(original) == original  # a local folder is returned as it is


def test_resolve_names_the_id_and_revision_when_nothing_is_cached(tmp_path, offline_cache):
    fill_cache(offline_cache, "user/name", saved_prefix(tmp_path / "p"))
    with pytest.raises(PrefixTuneError, match=r"'user/name' \(revision 'v2'\) cannot be downloaded.*offline"):
        hub.resolve("user/name", revision="v2")
    with pytest.raises(PrefixTuneError, match=r"'user/other' \(revision 'main'\) cannot be downloaded.*not in the"):
        hub.resolve("user/other")


def test_resolve_refuses_a_repository_without_a_prefix(tmp_path, offline_cache):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"pickle")
    fill_cache(offline_cache, "user/pickled", pickled)
    with pytest.raises(PrefixTuneError, match="PEFT adapter without adapter_model.safetensors.*pickle"):
        hub.resolve("user/pickled")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("hello")
    fill_cache(offline_cache, "user/empty", empty, commit="f" * 40)
    with pytest.raises(PrefixTuneError, match="holds no prefix: expected prefixtune_config.json"):
        hub.resolve("user/empty")


def test_resolve_refuses_what_is_neither_a_folder_nor_an_id(tmp_path):
    with pytest.raises(PrefixTuneError, match="prefix folder .*missing.folder. does not exist"):
        hub.resolve(str(tmp_path / "missing" / "folder"))
    with pytest.raises(PrefixTuneError, match="revision .* is for hub ids only"):
        hub.resolve(saved_prefix(tmp_path / "p"), revision="main")


def test_the_card_module_spells_the_file_names_the_rest_of_the_library_writes():
    assert model_card.TRAIN_INFO == tasks.TRAIN_INFO
    assert model_card.METRICS_LOG == run_log.METRICS_LOG


# --------------------------------------------------------------------------------------- upload
class RecordedHub:
    """HfApi's three upload calls, recorded; upload_folder also notes which files its patterns let through."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, dict] = {}
        self.sent: dict[str, bytes] = {}

        def create_repo(api, repo_id, **kw):
            self.calls["create_repo"] = {"repo_id": repo_id, **kw}

        def create_branch(api, repo_id, **kw):
            self.calls["create_branch"] = {"repo_id": repo_id, **kw}

        def upload_folder(api, **kw):
            self.calls["upload_folder"] = kw
            folder = Path(kw["folder_path"])
            names = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
            for name in filter_repo_objects(names, allow_patterns=kw["allow_patterns"]):
                self.sent[name] = (folder / name).read_bytes()
            return huggingface_hub.CommitInfo(
                commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{COMMIT}",
                commit_message=kw["commit_message"], commit_description="", oid=COMMIT,
            )  # fmt: skip

        for name, fake in (("create_repo", create_repo), ("create_branch", create_branch),
                           ("upload_folder", upload_folder)):  # fmt: skip
            monkeypatch.setattr(huggingface_hub.HfApi, name, fake)

    def card(self) -> tuple[dict, str]:
        text = self.sent["README.md"].decode()
        _, front, body = text.split("---\n", 2)
        return yaml.safe_load(front), body


def trained_folder(tmp_path: Path) -> Path:
    """What `prefixtune train` leaves: the prefix, its record, logs, a plot, checkpoints, test metrics."""
    folder = saved_prefix(tmp_path / "run")
    record = {"model": "smollm2", "dataset": "bbc_headline", "task": "causal_lm", "template": "{text}",
              "train_config": {"metric": "auto", "max_steps": 8}}  # fmt: skip
    serialization.write_json(folder / "prefixtune_train.json", record)
    lines = [{"split": "train", "step": 2, "loss": 3.0}, {"split": "eval", "step": 4, "loss": 2.5},
             {"split": "eval", "step": 8, "loss": 2.75, "perplexity": 15.6}]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    serialization.write_json(folder / "test_metrics.json", {"loss": 2.625, "rouge1": 0.4375})
    (folder / "curves.png").write_bytes(b"\x89PNG")
    (folder / "checkpoints" / "step-4").mkdir(parents=True)
    (folder / "checkpoints" / "step-4" / "optimizer.safetensors").write_bytes(b"state")
    (folder / "stray.bin").write_bytes(b"pickle")
    return folder


def test_push_sends_only_the_prefix_and_its_card(tmp_path, monkeypatch):
    recorded = RecordedHub(monkeypatch)
    folder = trained_folder(tmp_path)
    url = hub.push_to_hub(folder, "me/headlines", private=True, token="hf_x")
    assert url == f"https://huggingface.co/me/headlines/commit/{COMMIT}"
    assert recorded.calls["create_repo"] == {"repo_id": "me/headlines", "private": True, "exist_ok": True}
    assert "create_branch" not in recorded.calls
    upload = recorded.calls["upload_folder"]
    assert upload["repo_id"] == "me/headlines" and upload["revision"] is None
    assert sorted(recorded.sent) == ["README.md", "prefixtune_config.json", "prefixtune_model.safetensors",
                                     "prefixtune_train.json"]  # fmt: skip
    assert recorded.sent["README.md"] == (folder / "README.md").read_bytes()  # written into the folder first
    front, body = recorded.card()
    assert front["library_name"] == "prefixtune"
    assert front["tags"] == ["prefixtune", "prefix-tuning", "prefix"]
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the alias, as the hub knows it
    assert "| rouge1 | 0.4375 |" in body and "| loss | 2.6250 |" in body  # test metrics
    assert "Validation at step 4" in body  # the best validation line (lowest loss), where the prefix was kept
    assert "| data set | bbc_headline |" in body and "| prefix length | 3 virtual tokens |" in body
    assert 'PrefixModel.from_pretrained(base, "me/headlines")' in body


def test_push_to_a_branch_and_a_card_of_ones_own_is_kept(tmp_path, monkeypatch):
    recorded = RecordedHub(monkeypatch)
    folder = saved_prefix(tmp_path / "bare")
    (folder / "README.md").write_text("# my own words\n")
    hub.push_to_hub(folder, "me/bare", revision="exp-1")
    assert recorded.calls["create_branch"] == {"repo_id": "me/bare", "branch": "exp-1", "exist_ok": True}
    assert recorded.calls["upload_folder"]["revision"] == "exp-1"
    assert recorded.sent["README.md"] == b"# my own words\n"


def test_push_refuses_a_bad_id_or_a_folder_without_a_prefix(tmp_path, monkeypatch):
    recorded = RecordedHub(monkeypatch)
    with pytest.raises(PrefixTuneError, match="not a hub repository id"):
        hub.push_to_hub(saved_prefix(tmp_path / "p"), "no-namespace")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(PrefixTuneError, match="no prefixtune_config.json"):
        hub.push_to_hub(tmp_path / "pickled", "me/pickled")
    assert recorded.calls == {}


def test_offline_push_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PrefixTuneError, match="uploading .* to the Hugging Face Hub repository 'me/x'.*offline"):
        hub.push_to_hub(saved_prefix(tmp_path / "p"), "me/x", token="hf_x")


def test_card_of_a_live_model_names_its_base_model():
    base = tiny.make("llama")
    base.config.name_or_path = "acme/tiny-llama"
    text = hub.model_card(attach(base, method="prompt", num_virtual_tokens=4), {"dataset": "toy"})
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"library_name": "prefixtune", "tags": ["prefixtune", "prefix-tuning", "prompt"],
                     "base_model": "acme/tiny-llama", "pipeline_tag": "text-generation"}  # fmt: skip
    assert "soft prompt" in text and "| data set | toy |" in text and "## Results" not in text


# ------------------------------------------------------------------------------------------- CLI
def test_train_push_to_hub_uploads_the_run_with_its_test_metrics(tmp_path, monkeypatch, capsys):
    recorded = RecordedHub(monkeypatch)
    model = tiny.save("gpt2", tmp_path / "gpt2")
    rows = tiny.write_jsonl(tmp_path / "rows.jsonl", tiny.copy_rows(16))
    out = tmp_path / "out"
    argv = ["train", "--model", model, "--train-file", rows, "--test-file", rows, "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "8", "--num-virtual-tokens", "2", "--no-progress",
            "--max-length", "32", "--max-new-tokens", "3", "--target-column", "target",
            "--push-to-hub", "me/copy", "--hub-revision", "exp", "--hub-private"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert f"pushed to the hub: https://huggingface.co/me/copy/commit/{COMMIT}" in capsys.readouterr().out
    assert recorded.calls["create_repo"]["private"] is True and recorded.calls["upload_folder"]["revision"] == "exp"
    assert "metrics.jsonl" not in recorded.sent and "prefixtune_train.json" in recorded.sent
    sent_record = recorded.sent["prefixtune_train.json"].decode()  # no path of this machine leaves it
    assert str(tmp_path) not in sent_record and json.loads(sent_record)["model"] == "gpt2"
    assert "output_dir" in json.loads((out / "prefixtune_train.json").read_text())["train_config"]  # kept locally
    test = json.loads((out / "test_metrics.json").read_text())
    _, body = recorded.card()
    assert f"| loss | {test['loss']:.4f} |" in body


def test_train_refuses_a_bad_hub_id_before_training(tmp_path, capsys):
    argv = ["train", "--model", "unused", "--train-file", "unused.jsonl", "--output-dir", str(tmp_path / "out"),
            "--push-to-hub", "not an id"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "'not an id' is not a hub repository id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- serve
def test_prefixes_option_reads_folders_names_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert parse_sources(str(tmp_path / "local")) == (tmp_path / "local", {})
    assert parse_sources("served") == (Path("served"), {})  # a new folder to watch, as before
    assert parse_sources("local/new") == (Path("local/new"), {})  # `local` exists here: a folder, not an id
    assert parse_sources("served, news=user/news@v2, user/my.sentiment") == (
        Path("served"), {"news": "user/news@v2", "my-sentiment": "user/my.sentiment"}
    )  # fmt: skip
    with pytest.raises(PrefixTuneError, match="two folders to watch"):
        parse_sources("one,two")
    with pytest.raises(PrefixTuneError, match="names the prefix 'a' twice"):
        parse_sources("a=user/x,a=user/y")


def test_serving_places_hub_prefixes_in_the_folder(tmp_path, offline_cache):
    fill_cache(offline_cache, "user/news", saved_prefix(tmp_path / "news", seed=1), refs=("main", "v2"))
    fill_cache(offline_cache, "user/sentiment", saved_prefix(tmp_path / "sentiment", seed=2), commit="e" * 40)
    served = tmp_path / "served"
    saved_prefix(served / "local", seed=3)
    base = tiny.make("llama")
    spec = f"{served},news=user/news@v2,user/sentiment"
    folder = PrefixFolder(spec, PrefixCollection(base), reserved="base")
    folder.sync()
    assert folder.names() == ["local", "news", "sentiment"] and folder.errors == {}
    expected = PrefixModel.from_pretrained(tiny.make("llama"), tmp_path / "news")
    assert torch.equal(logits(folder.bank.members["news"]), logits(expected))
    assert not (served / "news").is_symlink() and not (served / "news" / serialization.WEIGHTS_NAME).is_symlink()
    signature = (served / "news" / serialization.CONFIG_NAME).stat().st_ino
    PrefixFolder(spec, PrefixCollection(base), reserved="base")  # a restart with the same command
    assert (served / "news" / serialization.CONFIG_NAME).stat().st_ino == signature  # left as it was
    with pytest.raises(PrefixTuneError, match=r"'user/gone' \(revision 'main'\) cannot be downloaded"):
        PrefixFolder(f"{served},gone=user/gone", PrefixCollection(base), reserved="base")
    hub_only = PrefixFolder("user/sentiment", PrefixCollection(base), reserved="base")  # a temporary folder
    hub_only.sync()
    assert hub_only.names() == ["sentiment"] and hub_only.root != served
    shutil.rmtree(hub_only.root)


# ------------------------------------------------------------------------------------ PrefixModel
def test_from_pretrained_takes_a_hub_id_and_a_revision(tmp_path, offline_cache):
    original = saved_prefix(tmp_path / "v1")
    fill_cache(offline_cache, "user/name", original, refs=("main", "v1"))
    by_id = PrefixModel.from_pretrained(tiny.make("llama"), "user/name")
    by_tag = PrefixModel.from_pretrained(tiny.make("llama"), "user/name", revision="v1")
    saved = PrefixModel.from_pretrained(tiny.make("llama"), original)
    assert torch.equal(logits(by_id), logits(saved)) and torch.equal(logits(by_tag), logits(saved))
    with pytest.raises(PrefixTuneError, match=r"'user/name' \(revision 'v9'\)"):
        PrefixModel.from_pretrained(tiny.make("llama"), "user/name", revision="v9")


def test_model_push_to_hub_sends_the_prefix_and_a_card(tmp_path, monkeypatch):
    recorded = RecordedHub(monkeypatch)
    model = attach(tiny.make("llama"), num_virtual_tokens=3, init="random")
    url = model.push_to_hub("me/tiny", info={"dataset": "toy"})
    assert url.endswith(COMMIT) and recorded.calls["create_repo"]["repo_id"] == "me/tiny"
    assert sorted(recorded.sent) == ["README.md", "prefixtune_config.json", "prefixtune_model.safetensors"]
    front, body = recorded.card()
    assert front["library_name"] == "prefixtune" and "prefix" in front["tags"]
    assert "| data set | toy |" in body
