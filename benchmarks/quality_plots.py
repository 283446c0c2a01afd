"""The quality benchmark's figures: accuracy vs FLOPs, kept channels per layer, INT8 and pruning sensitivity."""
from __future__ import annotations

import statistics
from collections.abc import Collection
from pathlib import Path
from typing import Any

from common import figure

from bevfusion_ext.compression.pruning.spec import owner

TOP_LAYERS = 15  # INT8-sensitive layers named in the bar panel


def _marker(entry: dict[str, Any]) -> str:
    """Circle for FP32, triangle for PTQ, square for QAT."""
    return "^" if entry["ptq"] else "s" if entry["stage"].endswith("_int8") else "o"


def plot_tradeoff(table: dict[str, dict], per_seed: list[dict[str, dict]]) -> Path:
    """NDS and mIoU against GFLOPs per stage: the median large, every seed small."""
    fig, axes, path = figure("quality_tradeoff", nrows=1, ncols=2, figsize=(13, 5.5))
    for ax, metric in zip(axes, ("det/NDS", "seg/mIoU"), strict=True):
        for i, (label, entry) in enumerate(table.items()):
            color, marker = f"C{i}", _marker(entry)
            ax.scatter([r[label]["flops"] / 1e9 for r in per_seed], [r[label][metric] for r in per_seed],
                       color=color, marker=marker, s=18, alpha=0.45)
            ax.scatter(entry["flops"] / 1e9, entry[metric], color=color, marker=marker, s=110, edgecolor="black",
                       label=label)
        ax.set(xlabel="GFLOPs per inference (2 x MACs)", ylabel=f"{metric} (median, seeds small)", title=metric)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    return path


def _median_per_layer(ratios: list[dict[str, float]]) -> dict[str, float]:
    """Median over seeds, layer by layer (same layers in every seed)."""
    return {layer: statistics.median(r[layer] for r in ratios) for layer in ratios[0]}


def plot_kept_ratios(kept: list[dict[str, dict[str, float]]], groups: Collection[str]) -> Path:
    """Kept / original output channels per prunable layer: progressive bars coloured by group, one-shot as marks."""
    progressive = _median_per_layer([k["progressive"] for k in kept])
    oneshot = _median_per_layer([k["oneshot"] for k in kept])
    layers = list(progressive)
    fig, ax, path = figure("quality_kept_channels", figsize=(max(10, 0.22 * len(layers)), 6))
    colors = {g: f"C{i}" for i, g in enumerate(groups)}
    for g in groups:
        xs = [i for i, n in enumerate(layers) if owner(n, groups) == g]
        ax.bar(xs, [progressive[layers[i]] for i in xs], color=colors[g], label=f"{g} (progressive)")
    ax.scatter(range(len(layers)), [oneshot[n] for n in layers], color="black", marker="_", s=80, zorder=3,
               label="one-shot")
    ax.set_xticks(range(len(layers)), [n.removeprefix(owner(n, groups) + ".") for n in layers], rotation=90,
                  fontsize=6)
    ax.set(ylabel="kept / original output channels (median over seeds)", ylim=(0, 1.2),
           title="Kept channels per prunable layer of the progressive-pruned model (auto-protected layers left out)")
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _quant_panels(axes: Any, quant: list[dict[str, float]]) -> None:
    """Sorted per-layer INT8 sensitivity (median over seeds, seeds as dots) and the most sensitive layers named."""
    median = sorted(_median_per_layer(quant).items(), key=lambda item: item[1], reverse=True)
    ranks = range(len(median))
    axes[0].plot(ranks, [v for _, v in median], color="C0", label="median")
    for q in quant:
        axes[0].scatter(ranks, [q[n] for n, _ in median], color="C0", s=6, alpha=0.35)
    axes[0].axhline(0, color="gray", linewidth=1)
    axes[0].set(xlabel="layer, most sensitive first", ylabel="training-loss increase, only this layer INT8",
                title=f"INT8 sensitivity of {len(median)} quantized layers (dense fine-tuned)")
    top = median[:TOP_LAYERS][::-1]
    axes[1].barh(range(len(top)), [v for _, v in top], color="C0")
    axes[1].set_yticks(range(len(top)), [n for n, _ in top], fontsize=7)
    axes[1].set(xlabel="training-loss increase (median over seeds)", title=f"the {TOP_LAYERS} most INT8-sensitive")


def _pruning_panel(ax: Any, pruning: list[dict[str, Any]], metric: str) -> None:
    """Metric vs fraction of one group's channels pruned (one shot, no fine-tune), median over seeds."""
    base = statistics.median(p["baseline"][metric] for p in pruning)
    for group, points in pruning[0]["groups"].items():
        ratios = [p["ratio"] for p in points]
        values = [statistics.median(s["groups"][group][i][metric] for s in pruning) for i in range(len(ratios))]
        ax.plot([0.0, *ratios], [base, *values], marker="o", label=group)
    ax.axhline(base, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="fraction of the group's channels pruned (one shot, no fine-tune)", ylabel=f"{metric} (median)",
           title=f"pruning sensitivity: {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_sensitivity(quant: list[dict[str, float]], pruning: list[dict[str, Any]]) -> Path:
    """Per-layer INT8 sensitivity (top row) and per-group pruning sensitivity curves (bottom row)."""
    fig, axes, path = figure("quality_sensitivity", nrows=2, ncols=2, figsize=(14, 10))
    _quant_panels(axes[0], quant)
    for ax, metric in zip(axes[1], ("det/NDS", "seg/mIoU"), strict=True):
        _pruning_panel(ax, pruning, metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_sweep(cells: dict[str, dict[str, list[dict | None]]], labels: dict[str, str],
               baseline: list[dict | None], metrics: tuple[str, ...]) -> Path:
    """Each metric against params removed: one line per method through the medians, every finished seed a dot,
    the dense baselines at 0 %."""
    fig, axes, path = figure("quality_sweep", nrows=1, ncols=len(metrics), figsize=(16, 5.5))
    dense = [b for b in baseline if b]
    for ax, metric in zip(axes, metrics, strict=True):
        if dense:
            ax.scatter([0] * len(dense), [b[metric] for b in dense], color="gray", s=14, alpha=0.6)
            ax.scatter(0, statistics.median(b[metric] for b in dense), color="gray", s=80, edgecolor="black",
                       label="dense baseline")
        for i, (method, by_ratio) in enumerate(cells.items()):
            done = {r: [c for c in seeds if c] for r, seeds in sorted(by_ratio.items())}
            done = {r: runs for r, runs in done.items() if runs}
            shift = 0.6 * (i - (len(cells) - 1) / 2)  # side by side, so each method's seeds stay readable
            for runs in done.values():
                ax.scatter([100 * c["params_removed"] + shift for c in runs], [c[metric] for c in runs],
                           color=f"C{i}", s=14, alpha=0.5)
            ax.plot([100 * statistics.median(c["params_removed"] for c in runs) for runs in done.values()],
                    [statistics.median(c[metric] for c in runs) for runs in done.values()], color=f"C{i}",
                    marker="o", label=labels[method])
        ax.set(xlabel="params removed (%)", ylabel=f"{metric} (median line, seeds as dots)", title=metric)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(cells) + 1, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    return path
