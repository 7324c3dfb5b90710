"""The training loop: exact resume, every optimizer, checkpointing, early stopping, logs and plots."""

from __future__ import annotations

import json

import pytest
import tiny
import torch

from prefixtune import attach, serialization
from prefixtune.errors import PrefixTuneError
from prefixtune.train import OPTIMIZERS, TrainConfig, train
from prefixtune.train.checkpoints import _flatten_optimizer, _unflatten_optimizer

LM_ROWS = tiny.copy_rows(48)
CLS_ROWS = [
    {"text": r["text"], "label": int(r["label"] == "pos") + (i % 3 == 0)}
    for i, r in enumerate(tiny.sentiment_rows(40))
]


def lm(seed: int = 0, **prefix):
    tok = tiny.tokenizer("decoder")
    model = tiny.make("gpt2", vocab_size=len(tok), pad_token_id=0, eos_token_id=3, bos_token_id=2)
    prefix.setdefault("num_virtual_tokens", 4)
    return attach(model, seed=seed, **prefix), tok


def classifier(seed: int = 0):
    tok = tiny.tokenizer("encoder")
    model = tiny.make("bert", task="classification", vocab_size=len(tok))
    return attach(model, num_virtual_tokens=3, seed=seed), tok


def cfg(tmp_path, name: str = "run", **kw) -> TrainConfig:
    kw.setdefault("batch_size", 8)
    kw.setdefault("progress", False)
    kw.setdefault("max_length", 32)
    kw.setdefault("template", "say {text} title :")
    kw.setdefault("eval_every", 0)  # these tests check other things than the data-sized defaults (test_defaults.py)
    kw.setdefault("patience", 0)
    return TrainConfig(output_dir=str(tmp_path / name), **kw)


def prefix_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_tensors().items()}


def loss_on(model, tok, rows, config) -> float:
    from prefixtune import tasks

    return tasks.lm_loss(model, tok, rows, config.max_length, 16, config.template)


# --------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    ("build", "rows", "options"),
    [
        (classifier, CLS_ROWS, {"optimizer": "adamw", "grad_accum": 2, "epochs": 3}),  # dropout on: RNG must resume
        (lm, LM_ROWS, {"optimizer": "adafactor", "epochs": 2, "scheduler": "cosine"}),
    ],
)
def test_kill_and_resume_gives_the_same_prefix(tmp_path, build, rows, options):
    base = dict(checkpoint_every=2, learning_rate=1e-2, **options)
    model, tok = build()
    train(model, tok, rows, rows[:8], cfg(tmp_path, "whole", **base))
    whole = prefix_of(model)

    model, tok = build()
    stopped = train(model, tok, rows, rows[:8], cfg(tmp_path, "cut", **base), stop_hook=lambda s: s.step == 5)
    assert stopped.steps == 5  # killed after step 5; the last checkpoint is from step 4
    model, tok = build(seed=123)  # a different initial prefix: the checkpoint must overwrite it
    resumed = train(model, tok, rows, rows[:8], cfg(tmp_path, "cut", resume=True, **base))
    assert resumed.steps > 5
    after = prefix_of(model)
    assert whole.keys() == after.keys()
    for key in whole:
        assert torch.equal(whole[key], after[key]), key
    steps = [r["step"] for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps)  # lines written after the checkpoint by the killed run were dropped


def test_resume_refuses_other_settings(tmp_path):
    model, tok = lm()
    train(model, tok, LM_ROWS, None, cfg(tmp_path, checkpoint_every=2, max_steps=2))
    model, tok = lm()
    with pytest.raises(PrefixTuneError, match="batch_size"):
        train(model, tok, LM_ROWS, None, cfg(tmp_path, checkpoint_every=2, max_steps=2, batch_size=4, resume=True))


def test_resume_without_checkpoint_is_an_error(tmp_path):
    model, tok = lm()
    with pytest.raises(PrefixTuneError, match="no checkpoint"):
        train(model, tok, LM_ROWS, None, cfg(tmp_path, resume=True))


@pytest.mark.parametrize("damage", ["missing", "not json", "not an object"])
def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path, damage):
    model, tok = lm()
    train(model, tok, LM_ROWS, None, cfg(tmp_path, checkpoint_every=2, max_steps=2))
    (scheduler,) = tmp_path.glob("**/scheduler.json")
    if damage == "missing":
        scheduler.unlink()
    else:
        scheduler.write_text("{trunc" if damage == "not json" else "[1, 2]")
    expected = {"missing": "cannot be read", "not json": "not valid JSON", "not an object": "must hold a JSON object"}
    model, tok = lm()
    with pytest.raises(PrefixTuneError, match=f"scheduler.json.*{expected[damage]}"):
        train(model, tok, LM_ROWS, None, cfg(tmp_path, checkpoint_every=2, max_steps=2, resume=True))


# ----------------------------------------------------------------------------------- optimizers
LEARNING_RATES = {"adamw": 0.1, "adam": 0.1, "sgd": 30.0, "rmsprop": 0.03, "adafactor": 0.1}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(tmp_path, name):
    model, tok = lm(num_virtual_tokens=8)
    config = cfg(tmp_path, optimizer=name, learning_rate=LEARNING_RATES[name], epochs=4, warmup_ratio=0.1)
    before = loss_on(model, tok, LM_ROWS, config)
    train(model, tok, LM_ROWS, None, config)
    after = loss_on(model, tok, LM_ROWS, config)
    assert after < before - 0.1, (name, before, after)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_round_trips_through_safetensors_and_json(name):
    model, _ = lm()
    config = TrainConfig(optimizer=name, progress=False, learning_rate=1e-2)
    from prefixtune.train import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, config)
    model(input_ids=torch.tensor([[4, 5, 6]]), labels=torch.tensor([[4, 5, 6]])).loss.backward()
    opt.step()
    tensors, meta = _flatten_optimizer(opt.state_dict())
    meta = json.loads(json.dumps(meta))  # what the checkpoint file holds
    restored = build_optimizer(params, config)
    restored.load_state_dict(_unflatten_optimizer(tensors, meta))
    a, b = opt.state_dict()["state"], restored.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in a:
        for slot, value in a[index].items():
            other = b[index][slot]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# ------------------------------------------------------------------------------ checkpointing
def test_gradient_checkpointing_trains_to_the_same_prefix(tmp_path):
    results = []
    for flag in (False, True):
        model, tok = classifier()  # dropout is on while training: recomputation must replay it
        train(
            model,
            tok,
            CLS_ROWS,
            None,
            cfg(tmp_path, f"gc{flag}", gradient_checkpointing=flag, max_steps=3, optimizer="sgd", learning_rate=0.5),
        )
        results.append(prefix_of(model))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- evaluation and output
def test_outputs_logs_plot_and_best_prefix(tmp_path):
    model, tok = classifier()
    snapshots = {}

    def remember(state):
        snapshots[state.step] = prefix_of(model)
        return False

    config = cfg(tmp_path, eval_every=2, patience=2, max_steps=12, learning_rate=1e-3, metric="loss")
    result = train(model, tok, CLS_ROWS, CLS_ROWS[:10], config, info={"model": "tiny"}, stop_hook=remember)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval"}
    assert all("loss" in r and "step" in r for r in records)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "prefixtune_train.json").read_text())["model"] == "tiny"
    assert result.best_step is not None
    saved = serialization.read_tensors(out)
    for key, value in saved.items():  # the folder and the model both hold the best prefix, not the last
        assert torch.equal(value, snapshots[result.best_step][key]), key
        assert torch.equal(value, model.state_tensors()[key]), key
    evals = [r for r in records if r["split"] == "eval"]
    assert min(r["loss"] for r in evals) == pytest.approx(result.best_value)
    if result.stopped_early:
        assert result.steps < 12


def test_bf16_autocast_and_time_limit(tmp_path):
    model, tok = lm()
    linear = next(m for m in model.base_model.modules() if isinstance(m, torch.nn.Linear))
    seen: set[torch.dtype] = set()
    hook = linear.register_forward_hook(lambda _m, _args, out: seen.add(out.dtype))
    result = train(model, tok, LM_ROWS, None, cfg(tmp_path, bf16=True, epochs=50, time_limit=1.0))
    hook.remove()
    assert torch.bfloat16 in seen  # the forward passes really ran under autocast
    assert result.out_of_time and 0 < result.steps < 50 * 6
    assert serialization.read_tensors(tmp_path / "run")["prefix"].dtype == torch.float32


@pytest.mark.parametrize(
    ("field", "value"),
    [("optimizer", "lion"), ("scheduler", "step"), ("batch_size", 0), ("learning_rate", -1.0), ("template", "{x}")],
)
def test_bad_settings_are_refused(field, value):
    with pytest.raises(PrefixTuneError, match=field.split("_")[0]):
        TrainConfig(**{field: value})


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    model, tok = classifier()
    config = cfg(tmp_path, eval_every=2, patience=2, max_steps=20, learning_rate=1e-12, metric="loss")
    result = train(model, tok, CLS_ROWS, CLS_ROWS[:10], config)
    assert result.stopped_early
    assert result.best_step == 2 and result.steps == 6  # evaluations at 2 (best), 4 and 6 (no better)


def test_group_by_length_batches_are_homogeneous_and_a_permutation():
    from prefixtune.train import EpochSampler

    lengths = [(i * 7919) % 61 + 1 for i in range(1003)]
    sampler = EpochSampler(len(lengths), seed=3, lengths=lengths, batch_size=8)
    order = list(sampler)
    assert sorted(order) == list(range(1003))
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of 8 from 1..61 spread about 45
    assert list(sampler) == order  # same seed and epoch, same order
    sampler.epoch = 1
    assert list(sampler) != order


@pytest.mark.parametrize("family", ["deberta_v2", "deberta", "mpnet", "bloom", "falcon"])
def test_adapted_families_train_and_reload(tmp_path, family):
    """The families outside the attention registry learn through the same loop and reload exactly."""
    from prefixtune import PrefixModel

    encoder = tiny.kind(family) == "encoder"
    tok = tiny.tokenizer("encoder" if encoder else "decoder")
    ids = {"vocab_size": len(tok), "pad_token_id": 0, "initializer_range": 0.2}  # far enough from uniform to learn

    def base():
        return tiny.make(family, task="classification" if encoder else None, **ids)

    model = attach(base(), num_virtual_tokens=3, init="random", seed=0)
    rows = (CLS_ROWS if encoder else LM_ROWS)[:8]  # one batch, learnt by heart
    config = cfg(tmp_path, learning_rate=3e-2, epochs=20, batch_size=8)
    batch = tok([r["text"] for r in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([r["label"] for r in rows]) if encoder else None

    def loss() -> float:
        with torch.no_grad():
            return float(model.eval()(**batch, labels=labels).loss) if encoder else loss_on(model, tok, rows, config)

    before = loss()
    train(model, tok, rows, None, config)
    assert loss() < before - 0.05
    model.save_pretrained(tmp_path / "saved")
    loaded = PrefixModel.from_pretrained(base(), tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-6, rtol=0)
