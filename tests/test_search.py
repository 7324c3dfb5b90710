"""`prefixtune tune`: the Optuna search on tiny saved models: test rows unseen, resumable, pruning, outputs."""

from __future__ import annotations

import json

import optuna
import pytest
import tiny
import torch

from prefixtune import cli, tasks
from prefixtune import train as train_module
from prefixtune.cli import search
from prefixtune.errors import PrefixTuneError
from prefixtune.model import PrefixModel
from prefixtune.train import defaults, loop, run_log


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    test_rows = [{"text": f"testmarker{i} good", "label": "pos" if i % 2 else "neg"} for i in range(6)]
    return {
        "bert": tiny.save("bert", root / "bert", task="classification"),
        "train": tiny.write_jsonl(root / "train.jsonl", tiny.sentiment_rows(32)),
        "val": tiny.write_jsonl(root / "val.jsonl", tiny.sentiment_rows(8, seed=1)),
        "test": tiny.write_jsonl(root / "test.jsonl", test_rows),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many times faster on one torch thread than on cores other tests keep busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_plots(monkeypatch):
    """curves.png and trials.png cost more than a tiny trial itself; only the outputs test draws them."""
    for module in (loop, run_log):
        monkeypatch.setattr(module, "plot_curves", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(search, "_plot", lambda *a, **k: None)


def small(assets, out, **extra):
    """Keyword options of a fast search: 2, 4 or 8 steps of 3 virtual tokens, evaluated every step."""
    return {
        "model": assets["bert"],
        "train_file": assets["train"],
        "validation_file": assets["val"],
        "output_dir": str(out),
        "batch_size": 8,
        "max_length": 32,
        "max_steps": 4,
        "num_virtual_tokens": 3,
        **extra,
    }


def load_study(out):
    return optuna.load_study(study_name="prefixtune", storage=f"sqlite:///{out / 'study.db'}")


def test_search_space_follows_reparam_and_fixed_options():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    opts = {"method": "prefix", "reparam": None, "learning_rate": None, "num_virtual_tokens": None}
    drawn = [search.suggest(study.ask(), opts, budget=100) for _ in range(40)]
    assert {s["reparam"] for s in drawn} == {"none", "mlp"}
    for s in drawn:
        low, high = search.LEARNING_RATES[s["reparam"]]
        assert low <= s["learning_rate"] <= high
        assert s["num_virtual_tokens"] in (8, 16, 32, 64) and s["steps"] in (50, 100, 200)
    trial = optuna.create_study().ask()
    fixed = search.suggest(trial, {**opts, "method": "prompt", "learning_rate": 0.5, "num_virtual_tokens": 5}, 1)
    assert fixed.pop("steps") in (1, 2)  # half of a 1-step budget still trains one step
    assert fixed == {"learning_rate": 0.5, "num_virtual_tokens": 5}  # and no reparam for prompt tuning
    assert set(trial.params) == {"steps"}
    base = {"max_steps": None, "epochs": None, "batch_size": 8, "grad_accum": 2}
    assert search.base_budget({**base, "max_steps": 30}, 1000) == 30
    assert search.base_budget({**base, "epochs": 3}, 100) == 3 * 7  # ceil(100 / 16) steps per epoch
    assert search.base_budget(base, 100) == defaults.MIN_STEPS  # small data: the minimum step budget
    assert search.base_budget(base, 16 * 500) == defaults.EPOCHS * 500  # large data: the default epochs


def test_the_search_never_reads_the_test_split(assets, tmp_path, monkeypatch, no_plots):
    seen: list[str] = []
    for name in ("evaluate", "encode"):
        real = getattr(tasks, name)

        def spy(model, tokenizer, rows, *args, _real=real, **kwargs):
            seen.extend(r["text"] for r in rows)
            return _real(model, tokenizer, rows, *args, **kwargs)

        monkeypatch.setattr(tasks, name, spy)
    result = cli.tune(**small(assets, tmp_path / "tune", test_file=assets["test"], trials=2))
    assert result["trials"] == 2
    assert seen and not [t for t in seen if "testmarker" in t]
    validation = {json.loads(line)["text"] for line in open(assets["val"], encoding="utf-8")}
    assert validation <= set(seen)  # trials were scored on the validation rows


def test_a_new_study_starts_from_the_train_defaults(assets, tmp_path, no_plots):
    cli.tune(**small(assets, tmp_path / "plain", trials=1))
    first = load_study(tmp_path / "plain").trials[0].params  # a small classification set: through the MLP
    assert first == {"reparam": "mlp", "learning_rate": defaults.learning_rate("prefix", "mlp", "classification"),
                     "steps": 4}  # fmt: skip (num_virtual_tokens is fixed by small(): not drawn)
    cli.tune(**small(assets, tmp_path / "fixed", trials=1, reparam="mlp", num_virtual_tokens=None))
    first = load_study(tmp_path / "fixed").trials[0].params
    assert first == {"learning_rate": defaults.learning_rate("prefix", "mlp", "classification"),
                     "num_virtual_tokens": search.DEFAULT_VIRTUAL_TOKENS, "steps": 4}  # fmt: skip


def test_a_rerun_continues_the_study(assets, tmp_path, monkeypatch, no_plots):
    calls = []
    real = train_module.train
    monkeypatch.setattr(train_module, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "tune"
    first = cli.tune(**small(assets, out, trials=2))
    assert first["trials"] == 2 and len(calls) == 2
    second = cli.tune(**small(assets, out, trials=3))
    assert second["trials"] == 3 and len(calls) == 3  # only the missing trial ran
    assert [t.number for t in load_study(out).trials] == [0, 1, 2]
    assert cli.tune(**small(assets, out, trials=3))["trials"] == 3 and len(calls) == 3  # nothing left to do
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1", "2"]


@pytest.mark.parametrize("pruner", ["median", "halving"])  # halving: the first trial's rungs count too
def test_a_trial_worse_than_the_others_is_pruned_at_its_first_report(assets, tmp_path, monkeypatch, no_plots, pruner):
    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="prefixtune")
    for lr in (0.05, 0.01):
        study.enqueue_trial({"learning_rate": lr, "reparam": "none", "steps": 8})

    trial_of = {}
    real_build = search.build_model

    def build(opts, *args):
        trial_of["lr"] = opts["learning_rate"]
        return real_build(opts, *args)

    # Training is real; the validation scores are scripted: the second trial is far worse at every evaluation.
    monkeypatch.setattr(search, "build_model", build)
    monkeypatch.setattr(tasks, "evaluate", lambda *a, **k: {"loss": 0.2 if trial_of["lr"] == 0.05 else 0.9})
    result = cli.tune(**small(assets, out, trials=2, metric="loss", pruner=pruner))
    states = [t.state.name for t in load_study(out).trials]
    assert states == ["COMPLETE", "PRUNED"] and result["pruned"] == 1
    assert load_study(out).trials[1].user_attrs["steps"] == 1  # stopped at its first report, not after 8 steps
    assert result["best_trial"] == 0 and result["best_value"] == pytest.approx(0.2)


@pytest.mark.parametrize(("patience", "steps"), [(None, 1 + defaults.PATIENCE), (0, 8)])
def test_a_trial_stops_early_as_train_would(assets, tmp_path, monkeypatch, no_plots, patience, steps):
    """A trial that stops improving ends after train's patience, like the `prefixtune train` run it stands for;
    with --patience 0 only the pruner may stop it (there is no other trial here to prune it against)."""
    monkeypatch.setattr(tasks, "evaluate", lambda *a, **k: {"loss": 0.5})  # flat from the first evaluation on
    cli.tune(**small(assets, tmp_path / "tune", trials=1, max_steps=8, patience=patience, metric="loss"))
    trial = load_study(tmp_path / "tune").trials[0]
    assert trial.params["steps"] == 8 and trial.user_attrs["steps"] == steps


def test_cli_run_writes_best_prefix_trials_log_and_plot(assets, tmp_path, capsys):
    out = tmp_path / "tune"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in small(assets, out, trials=2, eval_every=2).items()]
    code = cli.main(["tune", *argv, "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    study = load_study(out)
    assert [(r["number"], r["state"]) for r in records] == [(t.number, t.state.name) for t in study.trials]
    assert [r["value"] for r in records] == [t.value for t in study.trials]
    assert all(r["params"]["num_virtual_tokens"] == 3 and r["steps"] >= 1 for r in records)
    chosen = json.loads((out / "best" / "best_params.json").read_text())
    assert chosen["trial"] == study.best_trial.number and chosen["value"] == study.best_value
    assert chosen["params"] == records[chosen["trial"]]["params"]
    base, _, _ = tasks.load_model(assets["bert"], "classification", num_labels=2)
    assert PrefixModel.from_pretrained(base, out / "best").prefix_config.num_virtual_tokens == 3
    assert (out / "trials.png").read_bytes().startswith(b"\x89PNG")
    for n in ("0", "1"):
        assert {"metrics.jsonl", "curves.png", "prefixtune_config.json"} <= {
            p.name for p in (out / "trials" / n).iterdir()
        }
    assert "* | " + str(chosen["trial"]) in stdout  # the final table marks the best trial


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model": None}, "needs --model"),
        ({"trials": 0}, "--trials must be at least 1"),
        ({"timeout": 0}, "--timeout must be a positive"),
        ({"method": "text", "prefix_text": "good"}, "nothing to tune"),
    ],
)
def test_bad_input_is_one_error_line(assets, tmp_path, capsys, extra, message):
    opts = {k: v for k, v in {**small(assets, tmp_path / "tune"), **extra}.items() if v is not None}
    with pytest.raises(PrefixTuneError, match=message):
        cli.tune(**opts)
    code = cli.main(["tune", *[f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tune" / "trials").exists()


def test_unknown_pruner_and_a_study_of_another_direction_are_refused(assets, tmp_path, capsys):
    with pytest.raises(PrefixTuneError, match="pruner"):
        cli.tune(**small(assets, tmp_path / "a", pruner="hyperband"))
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before any work
        cli.main(["tune", "--model", assets["bert"], "--pruner", "hyperband"])
    assert exit_info.value.code == 2 and "error: argument --pruner: invalid choice" in capsys.readouterr().err
    out = tmp_path / "b"
    out.mkdir()
    optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="prefixtune", direction="maximize")
    with pytest.raises(PrefixTuneError, match="maximize its metric, this run would minimize 'loss'"):
        cli.tune(**small(assets, out, metric="loss"))
