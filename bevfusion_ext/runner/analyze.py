"""The seed plan's analysis tools on a real config + checkpoint: complexity table, latency profile, pruning
sensitivity measured with the real validation metric."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..compression import pruning as core
from ..compression.analysis import module_complexity, module_latency
from ..compression.recipe import MAX_RATIO
from .builder import build_dataset, build_model, example_batch
from .evaluate import evaluate_model
from .rebuild import load_compressed_model
from .train import prepare_config


def load_for_analysis(config: str, checkpoint: str | None, opts: list[str] = ()) -> tuple[nn.Module, Any, dict]:
    """The (possibly compressed) model from config + checkpoint, or the freshly initialised one without a checkpoint."""
    if checkpoint:
        return load_compressed_model(config, checkpoint, opts)
    cfg, sources = prepare_config(config, list(opts))
    val_set = build_dataset(cfg.data.val, "data.val", sources)
    return build_model(cfg, sources).eval(), cfg, example_batch(val_set)


def complexity_table(rows: list[dict[str, Any]]) -> str:
    """Seed 000's model complexity table: params and GFLOPs per module with shares of the total."""
    total = rows[0]
    lines = ["| module | params (M) | share | GFLOPs | share |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {'  ' * max(0, r['depth'] - 1)}{r['module']} | {r['params'] / 1e6:.3f} | "
            f"{r['params'] / max(1, total['params']):.1%} | {r['flops'] / 1e9:.3f} | "
            f"{r['flops'] / max(1, total['flops']):.1%} |"
        )
    return "\n".join(lines)


def latency_table(rows: list[dict[str, Any]]) -> str:
    """Per-module wall time on this machine, with shares of the whole forward."""
    total = rows[0]["ms"]
    lines = ["| module | ms | share |", "|---|---|---|"]
    lines += [f"| {'  ' * max(0, r['depth'] - 1)}{r['module']} | {r['ms']:.2f} | {r['ms'] / total:.1%} |" for r in rows]
    return "\n".join(lines)


def sensitivity(
    config: str,
    checkpoint: str,
    groups: list[str],
    ratios: list[float],
    importance: str = "magnitude",
    round_to: int = 1,
    opts: list[str] = (),
    batch_size: int = 4,
) -> dict[str, Any]:
    """Prune one group at a time to each ratio (one shot, no fine-tune) and measure the real validation metrics."""
    model, cfg, example = load_compressed_model(config, checkpoint, opts)
    _, sources = prepare_config(config, list(opts))
    val_set = build_dataset(cfg.data.val, "data.val", sources)
    result: dict[str, Any] = {
        "checkpoint": checkpoint,
        "importance": importance,
        "round_to": round_to,
        "baseline": evaluate_model(model, val_set, batch_size),
        "groups": {},
    }
    for group in groups:
        result["groups"][group] = []
        for ratio in ratios:
            if not 0 < ratio < MAX_RATIO:
                raise ValueError(f"sensitivity ratio {ratio}: must be in (0, {MAX_RATIO})")
            pruned = copy.deepcopy(model)
            spec = core.PruningSpec(groups={group: ratio}, importance=importance, round_to=round_to)
            core.apply_pruning(pruned, example, core.plan_pruning(pruned, example, spec, {group: ratio}))
            params, flops = core.count_params_flops(pruned, example)
            metrics = evaluate_model(pruned.eval(), val_set, batch_size)
            result["groups"][group].append({"ratio": ratio, "params": params, "flops": flops, **metrics})
    return result


def plot_sensitivity(result: dict[str, Any], path: Path, metrics: tuple[str, ...] = ("det/mAP", "seg/mIoU")) -> None:
    """One panel per metric: metric vs pruned-channel ratio, a line per group, the dense value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for group, points in result["groups"].items():
            ax.plot(
                [0.0] + [p["ratio"] for p in points],
                [result["baseline"][metric]] + [p[metric] for p in points],
                marker="o",
                label=group,
            )
        ax.axhline(result["baseline"][metric], color="gray", linestyle="--", linewidth=1)
        ax.set(xlabel="fraction of channels pruned (one shot, no fine-tune)", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(data: Any, path: Path) -> None:
    """Write an analysis result next to its plot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


__all__ = [
    "complexity_table",
    "latency_table",
    "load_for_analysis",
    "module_complexity",
    "module_latency",
    "plot_sensitivity",
    "sensitivity",
    "write_json",
]
