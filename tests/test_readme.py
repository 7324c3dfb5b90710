"""The README's quick start runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    assert "trainable params" in out and "tensor(" in out
    size = (tmp_path / "my-prefix" / "prefixtune_model.safetensors").stat().st_size
    assert size < 1_000_000
