"""Reliability: bad numbers stop (or are skipped) cleanly, a SIGKILL mid-checkpoint loses nothing,
no remote code is ever run, and a recipe file of any content only ever raises PrefixTuneError."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixtune import attach, serialization, tasks
from prefixtune.cli import recipes
from prefixtune.cli.options import VERB_OPTIONS
from prefixtune.errors import PrefixTuneError
from prefixtune.train import TrainConfig, train
from prefixtune.train.checkpoints import CHECKPOINTS, LATEST, TEST_PAUSE_ENV

ROWS = tiny.copy_rows(48)
POISON = {"text": "the movie was POISON good", "target": "good"}  # POISON is [UNK] (id 1), in no other row
UNK = 1


def lm(seed: int = 0):
    tok = tiny.tokenizer("decoder")
    model = tiny.make("gpt2", vocab_size=len(tok), pad_token_id=0, eos_token_id=3, bos_token_id=2)
    return attach(model, num_virtual_tokens=4, seed=seed), tok


def cfg(tmp_path, name: str = "run", **kw) -> TrainConfig:
    kw = {"batch_size": 8, "progress": False, "max_length": 32, "template": "say {text} title :", **kw}
    return TrainConfig(output_dir=str(tmp_path / name), **kw)


def prefix_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_tensors().items()}


class InfGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def poison(model, kind: str) -> None:
    """A batch holding the POISON row gets a NaN loss ("loss") or a finite loss with inf gradients ("grad")."""
    param = next(p for p in model.parameters() if p.requires_grad)

    def hook(module, args, kwargs, output):
        if module.training and bool((kwargs["input_ids"] == UNK).any()):
            if kind == "loss":
                output.loss = output.loss * float("nan")
            else:
                output.loss = output.loss + 0.0 * InfGradient.apply(param).sum()
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def poisoned_step(tmp_path, tok, rows) -> int:
    """The first step whose batch holds the POISON row (the data order is fixed by the seed)."""
    seen = []
    model, _ = lm()
    model.register_forward_hook(
        lambda m, a, k, o: seen.append(bool((k["input_ids"] == UNK).any())) if m.training else None,
        with_kwargs=True,
    )
    train(model, tok, rows, None, cfg(tmp_path, "probe", max_steps=6, learning_rate=1e-2))
    return seen.index(True) + 1


# ------------------------------------------------------------------------------------- bad numbers
@pytest.mark.parametrize(("kind", "words"), [("loss", "the loss is nan"), ("grad", "gradients of prefix")])
def test_bad_numbers_stop_training_and_keep_the_last_good_prefix(tmp_path, kind, words):
    rows = [*ROWS[:40], POISON]
    model, tok = lm()
    bad = poisoned_step(tmp_path, tok, rows)
    assert bad >= 2, "the seed must put the poisoned batch after the first step"
    snapshots = {}

    def remember(state):
        snapshots[state.step] = prefix_of(model)
        return False

    poison(model, kind)
    config = cfg(tmp_path, max_steps=6, checkpoint_every=1)
    with pytest.raises(PrefixTuneError, match=rf"stopped at step {bad} .*{words}.*--skip-bad-batches") as caught:
        train(model, tok, rows, None, config, stop_hook=remember)
    assert f"checkpoint of step {bad - 1}" in str(caught.value)
    assert max(snapshots) == bad - 1
    saved = serialization.read_tensors(tmp_path / "run")  # the folder holds the last good prefix, all finite
    for key, value in saved.items():
        assert torch.isfinite(value).all() and torch.equal(value, snapshots[bad - 1][key]), key
        assert torch.equal(model.state_tensors()[key], value), key  # the bad step never reached the optimizer
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "stopped" and records[-1]["step"] == bad

    # The checkpoint before the bad step resumes (here on clean data, so the run now finishes).
    assert json.loads((tmp_path / "run" / CHECKPOINTS / LATEST).read_text())["step"] == bad - 1
    fresh, _ = lm(seed=5)
    resumed = train(fresh, tok, rows, None, cfg(tmp_path, max_steps=6, checkpoint_every=1, resume=True))
    assert resumed.steps == 6 and resumed.skipped_steps == 0


def test_skip_bad_batches_counts_them_and_resumes_exactly(tmp_path, capsys):
    rows = [*ROWS[:40], POISON]  # 41 rows, batch 8: 6 steps an epoch, one of them poisoned
    base = {"epochs": 2, "checkpoint_every": 2, "skip_bad_batches": True}

    model, tok = lm()
    poison(model, "loss")
    whole = train(model, tok, rows, None, cfg(tmp_path, "whole", **base))
    assert whole.steps == 12 and whole.skipped_steps == 2  # once an epoch
    assert "skipped bad steps" in capsys.readouterr().out
    after_whole = prefix_of(model)
    assert all(torch.isfinite(v).all() for v in after_whole.values())
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in records if r["split"] == "skipped"]
    assert [r["skipped_steps"] for r in skips] == [1, 2] and "nan" in skips[0]["reason"]
    assert all(r["loss"] == r["loss"] for r in records if r["split"] == "train")  # no NaN logged as a loss

    model, tok = lm()
    poison(model, "grad")  # the other kind of bad number is skipped the same way
    assert train(model, tok, rows, None, cfg(tmp_path, "grad", **base)).skipped_steps == 2

    # Exact resume: the count travels through the checkpoint JSON.
    model, tok = lm()
    poison(model, "loss")
    cut = train(model, tok, rows, None, cfg(tmp_path, "cut", **base), stop_hook=lambda s: s.step == 7)
    assert cut.steps == 7
    saved = json.loads((tmp_path / "cut" / CHECKPOINTS / "step-0000006" / "state.json").read_text())
    assert saved["state"]["skipped_steps"] == 1
    model, tok = lm(seed=9)
    poison(model, "loss")
    resumed = train(model, tok, rows, None, cfg(tmp_path, "cut", resume=True, **base))
    assert resumed.steps == 12 and resumed.skipped_steps == 2
    for key, value in prefix_of(model).items():
        assert torch.equal(value, after_whole[key]), key


# ------------------------------------------------------------------------------------- kill -9
def _files_are_whole(root: Path) -> None:
    """Every file under its final name (not a dot-named temporary) parses completely."""
    for path in root.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)


def test_sigkill_during_checkpoint_save_then_resume_gives_the_same_prefix(tmp_path):
    model_dir = tiny.save("bert", tmp_path / "bert", task="classification")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.sentiment_rows(40)))

    def argv(out: str, *extra: str) -> list[str]:
        command = [sys.executable, "-m", "prefixtune.cli", "train", "--model", model_dir, "--train-file", str(data)]
        flags = ["--epochs", "2", "--batch-size", "8", "--num-virtual-tokens", "3", "--max-length", "32", "--seed", "7"]
        where = ["--output-dir", str(tmp_path / out)]
        return [*command, *flags, "--checkpoint-every", "2", "--no-progress", *where, *extra]

    env = {k: v for k, v in os.environ.items() if k != TEST_PAUSE_ENV} | {"HF_HUB_OFFLINE": "1"}
    # The uninterrupted run and the run to be killed go side by side.
    whole = subprocess.Popen(argv("whole"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(
        argv("cut"), env=env | {TEST_PAUSE_ENV: "4"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        seen = []
        for line in victim.stderr:
            seen.append(line)
            if line.startswith(f"{TEST_PAUSE_ENV}: paused in checkpoint step 4"):
                break
        else:
            pytest.fail("the run never reached the pause in checkpoint 4:\n" + "".join(seen[-20:]))
        victim.send_signal(signal.SIGKILL)  # while latest.json's temporary file is written but not renamed
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.stderr.close()
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err

    root = tmp_path / "cut" / CHECKPOINTS
    assert json.loads((root / LATEST).read_text())["checkpoint"] == "step-0000002"  # the previous one still rules
    assert list(root.glob(".latest.json.*.tmp")), "the kill should have left the unrenamed temporary file"
    _files_are_whole(root)  # nothing partial under a final name

    resumed = subprocess.run(argv("cut", "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(root.glob(".*.tmp")), "the stale temporary file is cleaned up by the next save"
    expected = serialization.read_tensors(tmp_path / "whole")
    got = serialization.read_tensors(tmp_path / "cut")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- remote code
@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    return tiny.save("gpt2", tmp_path_factory.mktemp("gpt2") / "model")


def test_loading_never_asks_for_remote_code(saved_gpt2, monkeypatch):
    import transformers

    calls = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    tasks.load_model(saved_gpt2)
    tasks.load_model(saved_gpt2, "classification", 2, ["no", "yes"])
    from prefixtune.serving.app import load_base

    load_base(saved_gpt2, device="cpu")
    names = {name for name, _ in calls}
    assert {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"} <= names
    assert all(flag is not True for _, flag in calls), calls


def test_a_model_folder_with_custom_code_is_refused_and_its_code_never_runs(saved_gpt2, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(saved_gpt2, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "evil-net", "auto_map": {"AutoConfig": "evil.EvilConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    # A prompt would be answered "yes": only never asking keeps the code from running.
    monkeypatch.setattr("builtins.input", lambda *a: "y")
    with pytest.raises(PrefixTuneError, match="cannot load model"):
        tasks.load_model(str(folder))
    assert not marker.exists()


def test_no_source_file_turns_remote_code_on():
    import prefixtune

    for path in Path(prefixtune.__file__).parent.rglob("*.py"):
        text = path.read_text(encoding="utf-8").replace(" ", "")
        assert "trust_remote_code=True" not in text, path


# ------------------------------------------------------------------------------------ recipe fuzz
KNOWN = {o.name for o in VERB_OPTIONS["train"]}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GOOD_YAML = "model: minilm\nepochs: 3\nlearning-rate: 0.01\nlayers: [0, 1]\ntemplate: 'say {text}'\n"
GOOD_JSON = json.dumps({"model": "minilm", "epochs": 3, "learning_rate": 0.01, "layers": [0, 1]})
HUGE = st.sampled_from(["9" * 5000, "1.0e999", "-1.0e999", ".nan", "1e400", "2001-02-30", "!!int abc", "!!float x"])
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.lists(st.integers(), max_size=3)
)


def check_recipe(folder: Path, suffix: str, data: bytes) -> None:
    path = folder / f"recipe{suffix}"
    path.write_bytes(data)
    try:
        recipes.load_recipe(path, KNOWN)
    except PrefixTuneError:
        pass


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".yaml", ".json"]))
def test_recipe_random_bytes(tmp_path_factory, data, suffix):
    check_recipe(tmp_path_factory.mktemp("recipe"), suffix, data)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=200), suffix=st.sampled_from([".yaml", ".json"]))
def test_recipe_truncated(tmp_path_factory, cut, suffix):
    text = GOOD_YAML if suffix == ".yaml" else GOOD_JSON
    check_recipe(tmp_path_factory.mktemp("recipe"), suffix, text.encode()[:cut])


@FUZZ
@given(
    key=st.sampled_from(sorted(KNOWN) + ["no_such_option", "1", "-"]),
    value=VALUES,
    huge=HUGE,
    nest=st.integers(min_value=0, max_value=1200),
)
def test_recipe_wrong_types_and_huge_numbers(tmp_path_factory, key, value, huge, nest):
    folder = tmp_path_factory.mktemp("recipe")
    check_recipe(folder, ".json", json.dumps({key: value}).encode())
    check_recipe(folder, ".json", f'{{"{key}": {huge}}}'.encode())
    check_recipe(folder, ".yaml", f"{key}: {huge}\n".encode())
    check_recipe(folder, ".yaml", f"{key}: {'[' * nest}1{']' * nest}\n".encode())  # nesting too deep
    check_recipe(folder, ".json", ("[" * nest * 10).encode())
    for top in ("[1, 2]", "3", "'text'", "null"):  # not a mapping
        check_recipe(folder, ".yaml", top.encode())
