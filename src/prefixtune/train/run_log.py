"""What a training run leaves for people to read: metrics.jsonl, curves.png and the summary table."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefixtune import serialization

METRICS_LOG = "metrics.jsonl"
CURVES = "curves.png"


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and fsynced so a crash loses at most one line."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def restart(self, resume_step: int | None) -> None:
        """A fresh run empties the log; a resumed one drops lines written after its checkpoint."""
        if not self.enabled:
            return
        keep = [r for r in self.records() if resume_step is not None and r.get("step", 0) <= resume_step]
        serialization.write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        return out


def plot_curves(records: Sequence[dict], path: Path) -> None:
    """Loss (train and eval) and eval metrics against steps, rendered in memory and written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    names = sorted({k for r in evals for k in r if k not in ("split", "step", "epoch", "loss", "perplexity")})
    fig, axes = plt.subplots(1, 2 if names else 1, figsize=(11 if names else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", alpha=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax.legend()
    if names:
        ax = axes[0][1]
        for name in names:
            ax.plot([r["step"] for r in evals if name in r], [r[name] for r in evals if name in r], "o-", label=name)
        ax.set(xlabel="step", title="evaluation metrics")
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    serialization.write_bytes(path, buffer.getvalue())


def summary_table(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column text table, for the end of a run."""
    cells = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in rows]
    width = max(len(k) for k, _ in cells)
    vwidth = max(len(v) for _, v in cells)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    body = [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in cells]
    return "\n".join([line, *body, line])
