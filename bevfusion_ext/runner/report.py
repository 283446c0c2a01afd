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


def _last(records: list[dict], epoch: int | None = None) -> dict:
    chosen = [r for r in records if epoch is None or r["epoch"] == epoch]
    if not chosen:
        raise FileNotFoundError(f"no evaluation{'' if epoch is None else f' at epoch {epoch}'} recorded")
    return chosen[-1]


def compression_stages(baseline: Path, pruned: Path | None, qat: Path | None) -> list[dict]:
    """The headline metrics of each stage of a compression pipeline, read from what the runs recorded."""
    stages = [{"stage": "baseline", "run": str(baseline), **_last(read_jsonl(baseline / "metrics.jsonl"))}]
    if pruned is not None:
        stages.append({"stage": "pruned + fine-tuned", "run": str(pruned),
                       **_last(read_jsonl(pruned / "metrics.jsonl"))})
    if qat is not None:
        records = read_jsonl(qat / "metrics.jsonl")
        stages.append({"stage": "+ INT8 PTQ (calibrated)", "run": str(qat), **_last(records, epoch=0)})
        stages.append({"stage": "+ INT8 QAT", "run": str(qat), **_last(records)})
    return stages


def qat_recovery(stages: list[dict], metric: str) -> float | None:
    """Fraction of what PTQ lost (vs the float model before it) that QAT won back; None when PTQ lost nothing."""
    by = {s["stage"]: s[metric] for s in stages}
    before = by.get("pruned + fine-tuned", by["baseline"])
    ptq, qat = by.get("+ INT8 PTQ (calibrated)"), by.get("+ INT8 QAT")
    if ptq is None or qat is None or before - ptq <= 0:
        return None
    return (qat - ptq) / (before - ptq)


def headline(stages: list[dict]) -> list[str]:
    """The headline metrics every stage recorded (a detection-only model has no seg/mIoU)."""
    return [k for k in HEADLINE if all(k in s for s in stages)]


def stages_table(stages: list[dict], sizes: dict[str, tuple[int, int]]) -> str:
    """Markdown: metrics, params and FLOPs per stage, and the change against the baseline."""
    base, metrics = stages[0], headline(stages)
    rows = ["| stage | " + " | ".join(metrics) + " | params | GFLOPs |", "|---|" + "---|" * (len(metrics) + 2)]
    for s in stages:
        params, flops = sizes.get(s["run"], (0, 0))
        cells = [f"{s[k]:.4f} ({s[k] - base[k]:+.4f})" if s is not base else f"{s[k]:.4f}" for k in metrics]
        rows.append(f"| {s['stage']} | " + " | ".join(cells) + f" | {params / 1e6:.3f} M | {flops / 1e9:.2f} |")
    return "\n".join(rows)
