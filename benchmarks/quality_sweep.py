"""Accuracy vs params removed (issue 13): one-shot, progressive, progressive + sparsity regulariser, and channel +
depth + head pruning at 30 / 45 / 60 / 70 % params removed, on 5 seeds, every run from quality.py's per-seed dense
`baseline` and trained by the real CLI into benchmarks/runs/quality/seed<k>/sweep/<method>_<pct>/.

    .venv/bin/python benchmarks/quality.py --sweep [--seeds 0 1 2 3 4] [--np 2] [--jobs 2] [--report-only]

Runs go in order of use: every baseline, then 45 % for every method and seed, then 70, 30 and 60 %. Finished runs are
reused (an interrupted sweep resumes) and a failed run is reported, not fatal. The report is written from whatever
has finished and names the missing cells: results/quality_sweep.{json,md,png}.
"""
from __future__ import annotations

import json
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml
from common import save, write_section
from quality import (
    CONFIG,
    METRICS,
    PRUNE,
    ROUND_TO,
    RUNS,
    Stage,
    agreement,
    evaluation,
    finished,
    prune_groups,
    seed_diffs,
    train,
)
from quality_plots import plot_sweep

from bevfusion_ext.compression.pruning import PruningSpec, scale_for_target, training_loss
from bevfusion_ext.compression.pruning.counting import trainable_params
from bevfusion_ext.compression.pruning.engine import pruned_copy
from bevfusion_ext.compression.pruning.sparsity import SparsityPenalty
from bevfusion_ext.compression.pruning.spec import MAX_RATIO
from bevfusion_ext.runner.analyze import load_for_analysis
from bevfusion_ext.runner.builder import build_dataloader, build_dataset
from bevfusion_ext.runner.report import read_jsonl
from bevfusion_ext.runner.train import prepare_config

RATIOS = (0.45, 0.70, 0.30, 0.60)  # run order: the most useful ratio first
SEEDS = (0, 1, 2, 3, 4)
EPOCHS = 2  # every sweep run: its pruning events in epoch 0, fine-tuning in epoch 1
TRAIN_SAMPLES = 48  # per epoch (data.train has 256): the budget that fits the session, see budget_text
EVENTS = 4  # progressive: prune_seed.yaml's event count, spread over epoch 0
SPARSITY = {"kind": "group_norm", "strength": 0.075}  # ~ as hard as the task loss: penalty_balance, in the report
STRUCTURE = "configs/compression/prune_structure_tiny.yaml"
KEEP_DEPTH = ("heads.object",)  # the tiny TransFusion head has one decoder layer: no depth pruning there
METHODS = {"oneshot": "one-shot", "progressive": "progressive", "progressive_reg": "progressive + regulariser",
           "structure": "channel + depth + head"}
PAIRS = (("progressive", "oneshot"), ("progressive_reg", "progressive"), ("structure", "progressive"))


def structure_targets() -> dict[str, dict[str, int]]:
    """prune_structure_tiny.yaml's depth and heads targets, without the depth of the one-layer TransFusion decoder."""
    pruning = yaml.safe_load(Path(STRUCTURE).read_text())["compression"]["pruning"]
    return {"depth": {p: n for p, n in pruning["depth"].items() if p not in KEEP_DEPTH}, "heads": pruning["heads"]}


def group_scales(ratios: tuple[float, ...]) -> dict[str, float]:
    """scale_for_target's group scale per ratio, for channels alone and with the depth + heads targets (key
    `<kind>_<pct>`), searched once on the dense tiny model and cached in RUNS: the removed params depend on the
    channel, block and head counts only, never on the weights, so every seed's run gets the scale its own search
    would find, without each run's first event repeating the search."""
    path = RUNS / "sweep_scales.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    wanted = {f"{kind}_{round(r * 100)}": (kind, r) for r in ratios for kind in ("channel", "structure")}
    if set(wanted) - set(cached):
        model, _, example = load_for_analysis(CONFIG, None)
        spec = PruningSpec(prune_groups(), round_to=int(ROUND_TO[1]))
        for key, (kind, ratio) in wanted.items():
            targets = structure_targets() if kind == "structure" else {}
            cached.setdefault(key, scale_for_target(model, example, spec, ratio, **targets))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=2))
    return cached


def cell_recipe(method: str, ratio: float, scale: float) -> str:
    """The run's whole pruning recipe: prune_seed.yaml with its groups times the searched scale in place of its
    target, round_to 4, the events of `method` in epoch 0, plus the regulariser or the depth + heads targets."""
    pruning = yaml.safe_load(Path(PRUNE).read_text())["compression"]["pruning"]
    pruning.pop("target")
    pruning["groups"] = {g: min(MAX_RATIO, scale * r) for g, r in pruning["groups"].items()}
    pruning["round_to"] = int(ROUND_TO[1])
    pruning["schedule"].update(start_epoch=0, end_epoch=1, num_events=1 if method == "oneshot" else EVENTS)
    pruning.update({"progressive_reg": {"sparsity": SPARSITY}, "structure": structure_targets()}.get(method, {}))
    path = RUNS / "sweep_recipes" / f"{cell_name(method, ratio).removeprefix('sweep/')}.yaml"
    text = (f"# {METHODS[method]} at {ratio:.0%} params removed, from {PRUNE} (written by quality_sweep.py; group "
            f"scale {scale:.4f} from scale_for_target)\n"
            + yaml.safe_dump({"compression": {"pruning": pruning}, "max_epochs": EPOCHS}, sort_keys=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:  # other seeds' runs of this cell may be reading it
        path.write_text(text)
    return str(path)


def cell_name(method: str, ratio: float) -> str:
    """The run directory of one method at one ratio, under seed<k>/sweep/."""
    return f"sweep/{method}_{round(ratio * 100)}"


def sweep_stage(method: str, ratio: float, scales: dict[str, float]) -> Stage:
    """One sweep run from the baseline, with the sweep's budget (TRAIN_SAMPLES per epoch, final evaluation only)."""
    kind = "structure" if method == "structure" else "channel"
    recipe = cell_recipe(method, ratio, scales[f"{kind}_{round(ratio * 100)}"])
    return Stage(cell_name(method, ratio), "baseline", ("--recipe", recipe, "--data.train.num_samples",
                                                         str(TRAIN_SAMPLES), "--evaluation.start", str(EPOCHS)))


def run_cell(seed: int, method: str | None, ratio: float | None, scales: dict[str, float], nproc: int) -> None:
    """Train the seed's baseline if no process has, then one sweep run (method None: the baseline only)."""
    seed_dir = RUNS / f"seed{seed}"
    (seed_dir / "sweep").mkdir(parents=True, exist_ok=True)
    stages = [Stage("baseline", None)] + ([sweep_stage(method, ratio, scales)] if method else [])
    try:
        for stage in stages:
            train(stage, seed_dir, seed, nproc)
    except subprocess.CalledProcessError as err:
        print(f"!! seed {seed} {stages[-1].name} failed ({err.returncode}): see {seed_dir}/{stages[-1].name}"
              ".console.log", flush=True)


def run_sweep(seeds: list[int], nproc: int, jobs: int) -> None:
    """Every baseline, then each ratio in RATIOS order for every seed and method, `jobs` runs at a time."""
    (RUNS / "sweep_driver.json").write_text(json.dumps({"np": nproc, "jobs": jobs, "seeds": seeds}))
    scales = group_scales(RATIOS)
    tasks = [(s, None, None) for s in seeds] + [(s, m, r) for r in RATIOS for s in seeds for m in METHODS]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda task: run_cell(*task, scales, nproc), tasks))


def pct(ratio: float) -> str:
    """A ratio as the whole percent that names its cells (`45`)."""
    return str(round(ratio * 100))


def cell(seed: int, method: str, ratio: float) -> dict[str, Any] | None:
    """A finished run's final metrics, params after its last event, blocks and heads before the first event and
    after the last, and its wall time; None if unfinished."""
    run = RUNS / f"seed{seed}" / cell_name(method, ratio)
    if not finished(run):
        return None
    events = read_jsonl(run / "pruning_events.jsonl")
    first, last = events[0], events[-1]
    record = json.loads((run / "benchmark.json").read_text())
    structure = {kind: {p: [first[kind][p][0], last[kind][p][1]] for p in last[kind]} for kind in ("blocks", "heads")}
    return {**evaluation(run, False), "params": last["params"], "params_removed": last["params_reduction"],
            **structure, "seconds": record["seconds"], "load_average": record.get("load_average"),
            "command": record["command"]}


def baseline_cell(seed: int) -> dict[str, Any] | None:
    """The seed's dense baseline: final metrics and wall time; None if unfinished."""
    run = RUNS / f"seed{seed}" / "baseline"
    if not finished(run):
        return None
    record = json.loads((run / "benchmark.json").read_text())
    return {**evaluation(run, False), "params_removed": 0.0, "seconds": record["seconds"],
            "load_average": record.get("load_average"), "command": record["command"]}


def claim(diffs: list[float], seeds: int) -> str:
    """The words the per-seed differences support: `better in 5/5 seeds` / `worse in 5/5 seeds` only when every seed
    agrees, else `inconclusive (k/5 ahead)`; with the median difference and any seed that has not finished both."""
    if not diffs:
        return "no seed finished both"
    n, ahead = len(diffs), sum(d > 0 for d in diffs)
    words = {"better": f"better in {n}/{n} seeds", "worse": f"worse in {n}/{n} seeds"}
    missing = f" ({seeds - n} of {seeds} seeds not finished)" if n < seeds else ""
    return (words.get(agreement(diffs), f"inconclusive ({ahead}/{n} ahead)")
            + f", median {statistics.median(diffs):+.3f}{missing}")


def claims(cells: dict[str, dict[str, list]], seeds: int) -> dict[str, dict[str, dict[str, str]]]:
    """Per ratio, per pair in PAIRS, per metric: the claim over the seeds where both methods finished."""
    out = {}
    for ratio in sorted(RATIOS):
        out[pct(ratio)] = {}
        for ours, other in PAIRS:
            both = [{ours: a, other: b} for a, b in zip(cells[ours][pct(ratio)], cells[other][pct(ratio)],
                                                          strict=True) if a and b]
            out[pct(ratio)][f"{METHODS[ours]} vs {METHODS[other]}"] = {
                m: claim(seed_diffs(both, ours, other, m), seeds) for m in METRICS}
    return out


def structure_floor(model: torch.nn.Module, example: Any) -> float:
    """Params fraction the depth + heads targets remove alone (channel ratios 0): must stay below the lowest ratio."""
    spec = PruningSpec(dict.fromkeys(prune_groups(), 0.0), round_to=int(ROUND_TO[1]))
    targets = structure_targets()
    pruned, _ = pruned_copy(model, example, spec, spec.groups, None, None, targets["depth"], targets["heads"])
    return 1.0 - trainable_params(pruned) / trainable_params(model)


def penalty_balance(checkpoint: Path) -> float:
    """Gradient norm of the SPARSITY penalty over that of the training loss, on the weights it regularises, on one
    training batch of a baseline: how hard the regulariser pushes against the task (1 = as hard)."""
    model, _, example = load_for_analysis(CONFIG, str(checkpoint))
    cfg, sources = prepare_config(CONFIG, [])
    loader = build_dataloader(build_dataset(cfg.data.train, "data.train", sources), cfg.data.samples_per_gpu, 0,
                              False, cfg.get("seed"))
    spec = PruningSpec(prune_groups(), round_to=int(ROUND_TO[1]))
    penalty = SparsityPenalty(model, example, spec, SPARSITY["kind"], SPARSITY["strength"])
    weights = list({id(s.param): s.param for _, slices in penalty.groups for s in slices}.values())

    def grad_norm(loss: torch.Tensor) -> float:
        return float(torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights, allow_unused=True)
                                if g is not None]).norm())

    return grad_norm(penalty()) / grad_norm(training_loss(model.train(), next(islice(loader, 1))))


def penalty_balances(seeds: list[int]) -> dict[str, float]:
    """penalty_balance on every finished baseline (cached per seed and SPARSITY setting)."""
    out = {}
    for seed in seeds:
        checkpoint = RUNS / f"seed{seed}" / "baseline" / "latest.pth"
        path = RUNS / f"seed{seed}" / "sweep" / f"penalty_balance_{SPARSITY['kind']}_{SPARSITY['strength']}.json"
        if baseline_cell(seed) and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(penalty_balance(checkpoint)))
        if path.is_file():
            out[str(seed)] = json.loads(path.read_text())
    return out


def collect(seeds: list[int]) -> dict[str, Any]:
    """Every finished cell (None where a run has not finished), keyed by method, then ratio, then seed order."""
    return {"baseline": [baseline_cell(s) for s in seeds],
            "cells": {m: {pct(r): [cell(s, m, r) for s in seeds] for r in sorted(RATIOS)} for m in METHODS}}


def _value(entry: dict | None, metric: str) -> str:
    return f"{entry[metric]:.3f}" if entry else "missing"


def _median(entries: list[dict | None], key: str) -> float | None:
    done = [e[key] for e in entries if e]
    return statistics.median(done) if done else None


def metric_table(result: dict[str, Any], metric: str) -> str:
    """One metric: per seed and the median over the finished seeds, for the baseline and every method and ratio."""
    seeds = result["seeds"]
    lines = [f"| method | params removed: target / measured (median) | {' | '.join(f'seed {s}' for s in seeds)} "
             "| median |", "|---|---|" + "---|" * (len(seeds) + 1)]
    rows = [("dense baseline", "0 / 0 %", result["baseline"])]
    for method, by_ratio in result["cells"].items():
        for ratio, entries in by_ratio.items():
            removed = _median(entries, "params_removed")
            rows.append((METHODS[method], f"{ratio} % / " + (f"{removed:.1%}" if removed is not None else "-"),
                         entries))
    for label, removed, entries in rows:
        median = _median(entries, metric)
        lines.append(f"| {label} | {removed} | " + " | ".join(_value(e, metric) for e in entries)
                     + f" | {'missing' if median is None else f'{median:.3f}'} |")
    return "\n".join(lines)


def spread_text(result: dict[str, Any]) -> str:
    """How far apart the methods' measured params removed are at a ratio (the schedules round differently)."""
    gaps = []
    for ratio in result["claims"]:
        removed = {m: _median(by_ratio[ratio], "params_removed") for m, by_ratio in result["cells"].items()}
        removed = {m: r for m, r in removed.items() if r is not None}
        if len(removed) > 1:
            low, high = min(removed, key=removed.get), max(removed, key=removed.get)
            gaps.append((removed[high] - removed[low], ratio, high, low, removed))
    if not gaps:
        return ""
    gap, ratio, high, low, removed = max(gaps)
    return (f"Measured params removed differ between the methods at one ratio by at most {100 * gap:.1f} "
            f"percentage points ({ratio} %: {METHODS[high]} {removed[high]:.1%}, {METHODS[low]} {removed[low]:.1%}, "
            "medians).")


def claims_table(result: dict[str, Any]) -> str:
    """The generated claims: per ratio and pair, what each metric's per-seed differences support."""
    lines = ["| params removed | comparison | det/NDS* | det/mAP | seg/mIoU |", "|---|---|" + "---|" * len(METRICS)]
    for ratio, pairs in result["claims"].items():
        lines += [f"| {ratio} % | {pair} | " + " | ".join(words[m] for m in METRICS) + " |"
                  for pair, words in pairs.items()]
    return "\n".join(lines)


def missing_text(result: dict[str, Any]) -> str:
    """Which runs have not finished (grouped by cell), or that all have."""
    seeds = result["seeds"]
    rows = [("baseline", result["baseline"])] + [(f"{METHODS[m]} {r} %", entries)
                                                 for m, by_ratio in result["cells"].items()
                                                 for r, entries in by_ratio.items()]
    gone = {label: [s for s, e in zip(seeds, entries, strict=True) if not e] for label, entries in rows}
    gone = {label: missing for label, missing in gone.items() if missing}
    total = len(seeds) * (1 + len(METHODS) * len(RATIOS))
    if not gone:
        return f"All {total} runs finished."
    count = sum(map(len, gone.values()))
    return (f"**{count} of {total} runs have not finished** (their cells read `missing`): "
            + "; ".join(f"{label} (seed {', '.join(map(str, missing))})" for label, missing in gone.items()) + ".")


def structure_text(result: dict[str, Any]) -> str:
    """Block and head counts before -> after of the channel + depth + head runs, as recorded by their events."""
    done = [e for entries in result["cells"]["structure"].values() for e in entries if e]
    if not done:
        return "no channel + depth + head run has finished"
    kinds = {"blocks": "blocks", "heads": "heads"}
    changes = {f"{path}: {a} -> {b} {kinds[kind]}" for e in done for kind in kinds for path, (a, b) in e[kind].items()}
    return "; ".join(sorted(changes))


def budget_text(result: dict[str, Any]) -> str:
    """The training budget and what it cost, from the runs' own records."""
    done = [e for by_ratio in result["cells"].values() for entries in by_ratio.values() for e in entries if e]
    base = [b for b in result["baseline"] if b]
    loads = [e["load_average"][0] for e in done + base if e.get("load_average")]
    per_method = ", ".join(f"{METHODS[m]} {_median([e for es in by_ratio.values() for e in es], 'seconds'):.0f} s"
                           for m, by_ratio in result["cells"].items()
                           if any(e for es in by_ratio.values() for e in es))
    driver = result["driver"]
    return (f"every sweep run trains {EPOCHS} epochs of {TRAIN_SAMPLES} of data.train's scenes (batch 4 per rank, "
            f"{driver['np']} ranks, the tiny config's AdamW schedule), its pruning events in epoch 0 and fine-tuning "
            f"in epoch 1, and is evaluated once at the end on the 64 val scenes; {driver['jobs']} runs at a time "
            f"(`--jobs`), at nice 19, on this 2-core machine shared with other heavy jobs (1-min load average at the "
            f"end of a run: median {statistics.median(loads) if loads else float('nan'):.1f}, max "
            f"{max(loads, default=float('nan')):.1f}). Wall time per run, median: {per_method or 'none finished'}; "
            f"the baselines {_median(base, 'seconds') or float('nan'):.0f} s (wall times include waiting for the CPU, "
            f"shared with the other runs of the sweep and other jobs); {len(done)} sweep runs, "
            f"{sum(e['seconds'] for e in done + base) / 3600:.1f} h of run wall time summed.")


def markdown(result: dict[str, Any], png: Path) -> str:
    """The section: method, budget, one table per metric, the generated claims and the plot."""
    scales = result["scales"]
    balance = statistics.median(result["penalty_balance"].values()) if result["penalty_balance"] else float("nan")
    strength = SPARSITY["strength"]
    tables = "\n\n".join(f"**{m}**{'*' if m == 'det/NDS' else ''}\n\n{metric_table(result, m)}" for m in METRICS)
    searched = {kind: ", ".join(f"{pct(r)} %: {scales[f'{kind}_{pct(r)}']:.3f}" for r in sorted(RATIOS))
                for kind in ("channel", "structure")}
    return f"""## Accuracy vs params removed: four ways to prune, five seeds (`quality.py --sweep`)

The `tiny` model on the synthetic scenes of `{CONFIG}`, seeds {", ".join(map(str, result["seeds"]))}. Every run
starts from its seed's dense baseline (quality.py's `baseline` stage, 6 epochs from scratch) and removes
{" / ".join(f"{r} %" for r in result["claims"])} of its params with the channel groups of `{PRUNE}` in their
proportions, `round_to` {ROUND_TO[1]} and magnitude importance, four ways:

1. **one-shot**: one event at iteration 0.
2. **progressive**: {EVENTS} events spread over epoch 0 (the recipe's cubic schedule).
3. **progressive + regulariser**: (2) plus `compression.pruning.sparsity` (kind `{SPARSITY["kind"]}`, strength
   `{strength}`) until the last event. Group lasso acts on exactly the channel weights the magnitude importance
   ranks (`bn_scale` would shrink BN scales that this importance does not read). The strength makes the penalty push
   about as hard as the task: the norm of its gradient on the weights it regularises is {balance:.2f} x that of the
   training loss, on one training batch of each baseline (median over seeds, `penalty_balance`); at the 1e-4 of
   docs/pruning.md it would be {balance * 1e-4 / strength:.1e} x, a negligible change of the gradient over the
   few iterations before the last event.
4. **channel + depth + head**: (2) plus the depth and heads targets of `{STRUCTURE}`, without depth pruning of the
   TransFusion decoder (the tiny head has one decoder layer): {structure_text(result)}. scale_for_target searches the
   channel scale with the final block and head counts applied, so the params target is that of (1)-(3); the
   measured column shows where the runs landed. The depth and heads targets alone remove
   {result["structure_floor"]:.1%} of the params, below the lowest ratio.

Group scales from scale_for_target, searched once per ratio on the dense model: channels {searched["channel"]};
with depth + heads {searched["structure"]}. The params a plan removes depend on channel, block and head counts only,
not on the weights, so this is the scale each run's own search would find.

**Budget**, the same for the four methods at every ratio: {budget_text(result)} This is a short fine-tune: the
numbers compare what each method keeps after pruning and a brief recovery, not converged accuracy.

{missing_text(result)} {spread_text(result)}

Per seed, and the median over the finished seeds (*NDS over the synthetic data's true-positive metrics):

{tables}

What the per-seed numbers support (paired within each seed; `better` / `worse` only when every finished seed
agrees):

{claims_table(result)}

![accuracy vs params removed](results/{png.name})

All per-run numbers, commands and wall times: `results/quality_sweep.json`.
"""


def report(seeds: list[int]) -> dict[str, Any]:
    """Write results/quality_sweep.{json,md,png} from whatever has finished."""
    model, _, example = load_for_analysis(CONFIG, None)
    result = {"seeds": seeds, "driver": json.loads((RUNS / "sweep_driver.json").read_text()), **collect(seeds),
              "scales": group_scales(RATIOS), "structure_floor": structure_floor(model, example),
              "penalty_balance": penalty_balances(seeds), "sparsity": SPARSITY,
              "budget": {"epochs": EPOCHS, "train_samples": TRAIN_SAMPLES, "events": EVENTS}}
    result["claims"] = claims(result["cells"], len(seeds))
    png = plot_sweep(result["cells"], METHODS, result["baseline"], METRICS)
    print("saved", save("quality_sweep", result), write_section("quality_sweep", markdown(result, png)), png)
    return result


def sweep(seeds: list[int], nproc: int, jobs: int, report_only: bool) -> None:
    """Run (or resume) the sweep unless report_only, then write the report."""
    if not report_only:
        run_sweep(seeds, nproc, jobs)
    result = report(seeds)
    print(missing_text(result), claims_table(result), sep="\n\n")


if __name__ == "__main__":
    raise SystemExit("quality_sweep.py is the --sweep part of quality.py: run benchmarks/quality.py --sweep")
