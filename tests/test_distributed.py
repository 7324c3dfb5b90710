"""Two processes through Accelerate (gloo, CPU) train to the same prefix as one process on the same
global batch, and only the main process writes the output folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from prefixtune import cli

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "cpu_2_processes.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = Path(tiny.save("bert", root / "bert", task="classification"))
    config = json.loads((model / "config.json").read_text())  # no dropout: ranks draw different masks
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.sentiment_rows(32)))
    return root, model, data


def argv(model, data, out, batch: int) -> list[str]:
    return ["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(out),
            "--batch-size", str(batch), "--max-steps", "4", "--optimizer", "adam", "--seed", "3",
            "--num-virtual-tokens", "3", "--no-progress", "--max-length", "32", "--warmup-ratio", "0"]  # fmt: skip


def test_accelerate_two_processes_equal_one_process_with_the_global_batch(setup):
    root, model, data = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
    proc = subprocess.run(
        [*launcher, "-m", "prefixtune.cli", *argv(model, data, root / "two", batch=4)],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The main process alone reports: the run's summary table, the baselines table, each evaluation once.
    out = proc.stdout
    assert out.count("trainable params") == 1 and out.count("best step") == 1, out
    assert out.count("validation accuracy beside the baselines") == 1, out
    evaluated = re.findall(r"^step (\d+): loss", out, flags=re.M)
    assert evaluated and len(evaluated) == len(set(evaluated)), out
    torch.set_num_threads(1)
    assert cli.main([*argv(model, data, root / "one", batch=8)]) == 0
    two = load_file(root / "two" / "prefixtune_model.safetensors")
    one = load_file(root / "one" / "prefixtune_model.safetensors")
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-5, msg=key)
    assert not torch.equal(one["prefix"], torch.zeros_like(one["prefix"]))
    # one output folder, written once: no per-rank copies or stray temporary files
    assert sorted(p.name for p in root.iterdir()) == ["bert", "one", "train.jsonl", "two"]
    assert not [p for p in (root / "two").rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
