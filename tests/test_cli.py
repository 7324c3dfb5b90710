"""The `prefixtune` command end to end on tiny saved models, and its one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import tiny

from prefixtune import cli
from prefixtune.cli import options
from prefixtune.errors import PrefixTuneError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "bert": tiny.save("bert", root / "bert", task="classification"),
        "gpt2": tiny.save("gpt2", root / "gpt2"),
        "bart": tiny.save("bart", root / "bart"),
        "train": tiny.write_jsonl(root / "train.jsonl", tiny.sentiment_rows(48)),
        "val": tiny.write_jsonl(root / "val.jsonl", tiny.sentiment_rows(12, seed=1)),
        "gtrain": tiny.write_jsonl(root / "gtrain.jsonl", tiny.copy_rows(32)),
        "gval": tiny.write_jsonl(root / "gval.jsonl", tiny.copy_rows(8, seed=1)),
    }


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ("--epochs", "2", "--batch-size", "8", "--num-virtual-tokens", "3", "--no-progress", "--max-length", "32",
        "--eval-every", "0", "--patience", "0")  # fmt: skip


def classifier_argv(assets, out) -> list[str]:
    """`train` on the tiny BERT with the sentiment toy data."""
    files = ["--train-file", assets["train"], "--validation-file", assets["val"]]
    return ["train", "--model", assets["bert"], *files, "--output-dir", str(out), *FAST]


# ------------------------------------------------------------------------------------ happy paths
def test_train_evaluate_predict_info(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cls"
    code, stdout, err = run(capsys, *classifier_argv(assets, out), "--test-file", assets["val"])
    assert code == 0, err
    assert "best accuracy" in stdout and "test (12 rows)" in stdout
    for name in (
        "prefixtune_config.json",
        "prefixtune_model.safetensors",
        "metrics.jsonl",
        "curves.png",
        "test_metrics.json",
        "prefixtune_train.json",
    ):
        assert (out / name).is_file(), name

    code, stdout, err = run(
        capsys, "evaluate", "--prefix", out, "--test-file", assets["val"], "--output", tmp_path / "m.json"
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"loss", "accuracy", "macro_f1"}
    trained = json.loads((out / "test_metrics.json").read_text())
    assert set(trained.pop("baselines")) == {"head_only"}  # the default baseline, scored on the same rows
    assert metrics == trained

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"good movie\n\nbad film\n")))
    code, stdout, err = run(capsys, "predict", "--prefix", out)
    assert code == 0, err
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["text"] for r in records] == ["good movie", "bad film"]
    assert all(r["label"] in ("neg", "pos") and 0 <= r["score"] <= 1 for r in records)

    code, _, err = run(capsys, "predict", "--prefix", out, "--input", assets["val"], "--output", tmp_path / "p.csv")
    assert code == 0, err
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "text,label,score" and len(lines) == 13

    code, stdout, err = run(capsys, "info", "--prefix", out, "--model", assets["bert"], "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["prefix"]["num_virtual_tokens"] == 3 and report["task"] == "classification"
    assert report["fits"]["fits"] is True
    assert report["trained_on"]["label_names"] == ["neg", "pos"]
    assert "prefix" in report["tensors"] and "head.classifier.weight" in report["tensors"]

    code, stdout, err = run(capsys, "info", "--prefix", out, "--model", assets["gpt2"])
    assert code == 0, err
    assert "no (" in stdout  # a GPT-2 is not the BERT this prefix was made for


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_train_then_generate(assets, tmp_path, capsys, family):
    out = tmp_path / family
    code, stdout, err = run(
        capsys,
        "train",
        "--model",
        assets[family],
        "--train-file",
        assets["gtrain"],
        "--validation-file",
        assets["gval"],
        "--target-column",
        "target",
        "--output-dir",
        out,
        "--template",
        "say {text} title :",
        "--eval-generate",
        "--max-new-tokens",
        "3",
        *FAST,
    )
    assert code == 0, err
    assert "best loss" in stdout
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert {"loss", "rouge1", "rouge2", "rougeL", "bleu"} <= set(evals[-1])
    code, stdout, err = run(
        capsys, "generate", "--prefix", out, "--prompt", "good movie", "--prompt", "bad", "--max-new-tokens", "4"
    )
    assert code == 0, err
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["text"] for r in records] == ["good movie", "bad"]
    assert all(isinstance(r["output"], str) and "[CLS]" not in r["output"] for r in records)
    code, stdout, err = run(
        capsys,
        "evaluate",
        "--prefix",
        out,
        "--test-file",
        assets["gval"],
        "--target-column",
        "target",
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err
    assert "rougeL" in stdout and "bleu" in stdout


def test_recipe_values_are_overridden_by_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: minilm\nlearning-rate: 1e-2\nepochs: 2\nlayers: [0, 1]\n")
    opts = options.resolve_options("train", {"recipe": str(recipe), "epochs": 5})
    assert opts["epochs"] == 5 and opts["learning_rate"] == 0.01 and opts["layers"] == [0, 1]
    assert opts["model"] == "minilm" and opts["batch_size"] == 16  # untouched defaults
    (tmp_path / "r.json").write_text(json.dumps({"optimizer": "sgd"}))
    assert options.resolve_options("train", {"recipe": str(tmp_path / "r.json")})["optimizer"] == "sgd"


def test_a_recipe_that_is_not_utf8_is_named_with_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("model: minilm\ntemplate: caf\u00e9 {text}\n".encode("latin-1"))
    with pytest.raises(PrefixTuneError, match=r"recipe .*r.yaml: not valid UTF-8 at line 2 \(byte offset 27\)"):
        options.resolve_options("train", {"recipe": str(recipe)})


def test_hub_dataset_path_maps_columns(monkeypatch):
    import prefixtune.data

    fake = {
        "train": [{"sentence": "good", "y": 1}, {"sentence": "bad", "y": 0}],
        "validation": [{"sentence": "x", "y": 1}],
    }
    monkeypatch.setattr(prefixtune.data, "load_hub_dataset", lambda name, config=None: fake)
    opts = options.resolve_options("train", {"hub_dataset": "some/set", "text_column": "sentence", "label_column": "y"})
    splits, names = cli.load_data(opts)
    assert splits["train"] == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    assert names == ["0", "1"] and set(splits) == {"train", "validation"}


def test_help_texts_come_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--learning-rate" in text and "P-tuning v2" in text and "--num-virtual-tokens" in text
    assert "--recipe" in text and "--gradient-checkpointing" in text
    for verb in ("evaluate", "predict", "generate", "info", "demo", "serve"):
        with pytest.raises(SystemExit):
            cli.main([verb, "--help"])
        assert "--" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ serve
@pytest.fixture
def served(monkeypatch):
    """What `prefixtune serve` hands the server: `serve`'s arguments, recorded instead of starting uvicorn."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import prefixtune.serving.app

    seen = {}
    monkeypatch.setattr(prefixtune.serving.app, "serve", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    monkeypatch.delenv("PREFIXTUNE_ADMIN_TOKEN", raising=False)
    return seen


def test_serve_command_line_options(served, monkeypatch, tmp_path):
    """`prefixtune serve`'s flags and the `cli.serve` function reach the server as `serve`'s keyword arguments."""
    monkeypatch.setenv("PREFIXTUNE_ADMIN_TOKEN", "from-env")
    argv = ["serve", "--model", "smollm2", "--prefixes", str(tmp_path), "--port", "9001", "--max-batch-size", "4",
            "--reload-interval", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    assert served["args"] == ("smollm2", str(tmp_path))
    options = served["kwargs"]
    assert options["port"] == 9001 and options["max_batch_size"] == 4 and options["admin_token"] == "from-env"
    assert options["reload_interval_s"] is None and options["host"] == "127.0.0.1"
    cli.serve(model="m", prefixes="p", port=None)  # the Python function's way: None takes the default
    assert served["args"] == ("m", "p") and served["kwargs"]["port"] == 8000


def test_serve_reads_a_recipe_and_flags_win(served, tmp_path, capsys):
    from prefixtune.serving.limits import Settings

    recipe = tmp_path / "serve.yaml"
    recipe.write_text(
        "model: smollm2\nprefixes: adapters/\nmax-batch-size: 16\nreload-interval: 5\nrequest_timeout: 60\n"
        "admin-token: from-recipe\nthreads: 2\n"
    )
    code, _, err = run(capsys, "serve", "--recipe", recipe, "--max-batch-size", "2")
    assert code == 0, err
    assert served["args"] == ("smollm2", "adapters/")
    options = served["kwargs"]
    assert options["max_batch_size"] == 2  # the flag wins over the recipe
    assert options["reload_interval_s"] == 5.0 and options["request_timeout_s"] == 60.0
    assert options["admin_token"] == "from-recipe" and options["num_threads"] == 2
    settings = Settings(**{k: v for k, v in options.items() if k in Settings.__dataclass_fields__})
    assert settings.max_queue == Settings().max_queue  # what neither sets keeps the server's own default
    assert set(options) - set(Settings.__dataclass_fields__) == {
        "host", "port", "served_model_name", "device", "dtype", "num_threads"
    }  # fmt: skip

    recipe.write_text("model: smollm2\nmax-batch-size: many\n")
    code, _, err = run(capsys, "serve", "--recipe", recipe, "--prefixes", "p")
    assert code == 2 and "option 'max_batch_size' must be an integer" in err
    code, _, err = run(capsys, "serve", "--model", "smollm2")
    assert code == 2 and err.strip() == "error: serve needs --prefixes"


def test_serve_without_the_server_packages_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if FastAPI were not installed
    monkeypatch.delitem(sys.modules, "prefixtune.serving.app", raising=False)
    code, _, err = run(capsys, "serve", "--model", "smollm2", "--prefixes", "p")
    assert code == 2
    assert err.strip() == "error: prefixtune serve needs FastAPI and uvicorn: pip install 'prefixtune[serve]'"


# ----------------------------------------------------------------------------------- bad input
def bad_input_cases(root, assets):
    (root / "cols.csv").write_text("sentence,label\ngood,pos\n")
    (root / "empty.csv").write_text("text,label\n")
    tiny.write_jsonl(root / "unknown.jsonl", [{"text": "good", "label": "neutral"}])
    (root / "latin1.csv").write_bytes(b"text,label\ngood,pos\ncaf\xe9 bad,neg\n")
    (root / "recipe.yaml").write_text("learning_rat: 0.1\nepochs: 1\n")
    (root / "badvalue.yaml").write_text("warmup_ratio: lots\n")
    return {
        "missing file": (["--train-file", root / "nope.csv"], "file not found"),
        "missing column": (["--train-file", root / "cols.csv"], "columns present: sentence, label"),
        "empty data set": (["--train-file", root / "empty.csv"], "empty"),
        "unknown label": (
            ["--train-file", assets["train"], "--validation-file", root / "unknown.jsonl"],
            "unknown label 'neutral'",
        ),
        "non-UTF-8": (["--train-file", root / "latin1.csv"], "not valid UTF-8 at line 3"),
        "recipe unknown key": (["--train-file", assets["train"], "--recipe", root / "recipe.yaml"], "learning_rat"),
        "recipe bad value": (["--train-file", assets["train"], "--recipe", root / "badvalue.yaml"], "warmup_ratio"),
        "no data": ([], "exactly one data source"),
    }


CASES = [
    "missing file",
    "missing column",
    "empty data set",
    "unknown label",
    "non-UTF-8",
    "recipe unknown key",
    "recipe bad value",
    "no data",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_writes_nothing(assets, tmp_path, capsys, case):
    argv, expected = bad_input_cases(tmp_path, assets)[case]
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "train", "--model", assets["bert"], "--output-dir", out, *argv, *FAST)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err
    assert not out.exists()


def test_predict_errors_leave_the_previous_output_alone(assets, tmp_path, capsys, monkeypatch):
    target = tmp_path / "pred.jsonl"
    target.write_text("old\n")
    code, _, err = run(
        capsys, "predict", "--prefix", tmp_path / "missing", "--input", assets["val"], "--output", target
    )
    assert code == 2 and "does not exist" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\xfe\n")))
    code, _, err = run(capsys, "predict", "--prefix", tmp_path / "missing", "--output", target)
    assert code == 2 and "not valid UTF-8 at line 2" in err and err.count("\n") == 1
    assert target.read_text() == "old\n"
    assert list(tmp_path.glob(".pred.jsonl.*")) == []


def test_python_functions_raise_instead_of_exiting(assets):
    with pytest.raises(PrefixTuneError, match="unknown option"):
        cli.train(model=assets["bert"], learning_rat=0.1)
    with pytest.raises(PrefixTuneError, match="option 'epochs' must be an integer"):
        cli.train(model=assets["bert"], epochs="x")


def test_console_script_exit_code_and_single_line():
    proc = subprocess.run(
        [sys.executable, "-m", "prefixtune.cli", "evaluate", "--prefix", "/nonexistent/prefix"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: prefix folder '/nonexistent/prefix' does not exist"]


def test_two_processes_share_the_data_and_write_once(assets, tmp_path):
    """The same `train` under torchrun with 2 gloo CPU ranks: half the steps each, one set of files."""
    out = tmp_path / "ddp"
    argv = [*classifier_argv(assets, out), "--checkpoint-every", "2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "prefixtune.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best accuracy") == 1  # only the main process reports
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 6  # 48 rows / batch 8 / 2 processes x 2 epochs
    checkpoint = next((out / "checkpoints").glob("step-*"))
    assert {p.name for p in checkpoint.glob("rng-*.safetensors")} == {"rng-0.safetensors", "rng-1.safetensors"}
