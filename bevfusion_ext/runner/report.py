"""Human-readable summaries of what a run directory recorded (metrics.jsonl, consistency.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

HEADLINE = ("det/mAP", "det/NDS", "seg/mIoU")


def read_jsonl(path: Path) -> list[dict]:
    """All records of a run-directory JSONL log (empty if the run never wrote it)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_table(run_dir: str | Path) -> str:
    """A Markdown table of every evaluation of a run: epoch 0 is the model before training."""
    records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl: no evaluations recorded; was evaluation enabled?")
    rows = ["| epoch | iter | " + " | ".join(HEADLINE) + " |", "|---|---|" + "---|" * len(HEADLINE)]
    for rec in records:
        rows.append(
            f"| {rec['epoch']} | {rec['iter']} | "
            + " | ".join(f"{rec.get(k, float('nan')):.4f}" for k in HEADLINE)
            + " |"
        )
    return "\n".join(rows)
