"""Quality on the synthetic task at equal data, seeds and training budget: the dense baseline, one-shot vs
progressive pruning, INT8 PTQ and QAT, each stage trained by the real CLI (`torchpack dist-run` +
tools/train_compressed.py) into benchmarks/runs/quality/seed<k>/<stage>/, compared per seed and as medians over seeds.

    .venv/bin/python benchmarks/quality.py [--seeds 0 1 2] [--np 2] [--fresh]
    .venv/bin/python benchmarks/quality.py --sweep [--seeds 0 1 2 3 4] [--np 2] [--jobs 2] [--report-only]

--sweep runs the accuracy-vs-params sweep of quality_sweep.py from the same per-seed baselines instead.

Finished stages (final checkpoint + final evaluation on disk) are reused, so an interrupted run resumes; --fresh
re-runs everything. The whole benchmark runs at nice 19.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml
from common import ROOT, save, write_section
from quality_plots import plot_kept_ratios, plot_sensitivity, plot_tradeoff

from bevfusion_ext.compression.analysis import eval_forward
from bevfusion_ext.compression.pruning import auto_protected, count_params_flops, training_loss
from bevfusion_ext.compression.pruning.counting import channel_layers
from bevfusion_ext.compression.pruning.protection import protected_modules
from bevfusion_ext.compression.pruning.spec import owner
from bevfusion_ext.compression.quantization import layer_sensitivity
from bevfusion_ext.runner.analyze import load_for_analysis
from bevfusion_ext.runner.builder import build_dataloader, build_dataset
from bevfusion_ext.runner.rebuild import load_compressed_model
from bevfusion_ext.runner.report import HEADLINE, read_jsonl
from bevfusion_ext.runner.train import compression_recipe, prepare_config

CONFIG = "configs/synthetic/multitask/tiny.yaml"
PRUNE = "configs/compression/prune_seed.yaml"
QAT = "configs/compression/qat_int8.yaml"
RUNS = Path("benchmarks/runs/quality")  # paths are relative to ROOT, the working directory of main()
ROUND_TO = ("--compression.pruning.round_to", "4")  # as scripts/demo.sh: the tiny model's layers have 16-128 channels
LIMIT = 0.03  # the seed plan's accuracy limit for prune + QAT, relative to the baseline


def float_schedule(recipe: str) -> str:
    """The recipe's training schedule (epochs, optimizer, LR) without its `compression:` section, as a recipe file."""
    path = RUNS / f"{Path(recipe).stem}_float.yaml"
    schedule = {k: v for k, v in yaml.safe_load(Path(recipe).read_text()).items() if k != "compression"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {recipe}'s training schedule without compression (written by quality.py)\n"
                    + yaml.safe_dump(schedule))
    return str(path)


@dataclass(frozen=True)
class Stage:
    """One training run: the stage whose latest.pth it loads and what it adds to the tiny config."""

    name: str
    parent: str | None
    options: tuple[str, ...] = ()


def stages() -> tuple[Stage, ...]:
    """The pipeline per seed; every fine-tune from `baseline` uses prune_seed.yaml's schedule, every later run qat's."""
    return (
        Stage("baseline", None),
        Stage("dense_ft", "baseline", ("--recipe", float_schedule(PRUNE))),
        Stage("oneshot", "baseline", ("--recipe", PRUNE, *ROUND_TO, "--compression.pruning.schedule.num_events", "1")),
        Stage("progressive", "baseline", ("--recipe", PRUNE, *ROUND_TO)),
        Stage("progressive_int8", "progressive", ("--recipe", QAT)),
        Stage("dense_int8", "dense_ft", ("--recipe", QAT)),
        Stage("dense_ft_long", "dense_ft", ("--recipe", float_schedule(QAT))),
    )


@dataclass(frozen=True)
class Row:
    """A table row: one evaluation of one stage (PTQ = epoch 0 of a QAT run, the calibrated model before training)."""

    label: str
    stage: str
    ptq: bool = False
    reference: bool = False  # a dense float model: the same-budget reference of the rows with its training epochs


ROWS = (
    Row("baseline (from scratch)", "baseline", reference=True),
    Row("dense, fine-tuned", "dense_ft", reference=True),
    Row("one-shot pruning + fine-tune", "oneshot"),
    Row("progressive pruning + fine-tune (ours)", "progressive"),
    Row("dense + INT8 PTQ", "dense_int8", ptq=True),
    Row("progressive pruning + INT8 PTQ", "progressive_int8", ptq=True),
    Row("dense, fine-tuned longer (QAT schedule, FP32)", "dense_ft_long", reference=True),
    Row("dense + INT8 QAT", "dense_int8"),
    Row("progressive pruning + INT8 QAT (ours)", "progressive_int8"),
)
METRICS = ("det/NDS", "det/mAP", "seg/mIoU")
VERDICT_ROWS = ("one-shot pruning + fine-tune", "progressive pruning + fine-tune (ours)",
                "dense, fine-tuned longer (QAT schedule, FP32)", "progressive pruning + INT8 QAT (ours)")


def max_epochs(run: Path) -> int:
    """The epochs a run was configured for, from the config the trainer dumped."""
    return yaml.safe_load((run / "configs.yaml").read_text())["runner"]["max_epochs"]


def finished(run: Path) -> bool:
    """The run wrote its final checkpoint and its final evaluation (and this script recorded the command)."""
    if not (run / "benchmark.json").is_file():
        return False
    last = max_epochs(run)
    evaluated = any(r["epoch"] == last for r in read_jsonl(run / "metrics.jsonl"))
    return evaluated and (run / f"epoch_{last}.pth").is_file()


def train(stage: Stage, seed_dir: Path, seed: int, nproc: int) -> dict[str, Any]:
    """Run one stage through the real CLI, unless a finished run of the same command is on disk; returns command +
    seconds."""
    run = seed_dir / stage.name
    load = ("--load_from", str(seed_dir / stage.parent / "latest.pth")) if stage.parent else ()
    command = ["torchpack", "dist-run", "-np", str(nproc), "python", "tools/train_compressed.py", CONFIG,
               "--run-dir", str(run), "--seed", str(seed), *load, *stage.options]
    seed_dir.mkdir(parents=True, exist_ok=True)
    with open(seed_dir / f"{stage.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another benchmark process trains this stage: wait, then reuse its run
        if not (finished(run) and json.loads((run / "benchmark.json").read_text())["command"] == command):
            shutil.rmtree(run, ignore_errors=True)
            print(f"== seed {seed} {stage.name}: {' '.join(command)}", flush=True)
            env = {**os.environ, "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"}
            tic = time.perf_counter()
            with open(seed_dir / f"{stage.name}.console.log", "w") as log:
                subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
            record = {"command": command, "seconds": round(time.perf_counter() - tic, 1),
                      "load_average": os.getloadavg()}
            (run / "benchmark.json").write_text(json.dumps(record, indent=2))
    return {**json.loads((run / "benchmark.json").read_text()), "epochs": max_epochs(run)}


def pruning_sensitivity(seed_dir: Path) -> dict[str, Any]:
    """tools/analyze.py sensitivity on the fine-tuned dense model: each group pruned alone, one shot, real metrics."""
    out = seed_dir / "pruning_sensitivity"
    command = [sys.executable, "tools/analyze.py", "sensitivity", CONFIG, "--checkpoint",
               str(seed_dir / "dense_ft" / "latest.pth"), "--round-to", ROUND_TO[1], "--out", str(out)]
    if not (out / "sensitivity.json").is_file():
        print(f"== {' '.join(command)}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return {"command": command, **json.loads((out / "sensitivity.json").read_text())}


def quant_sensitivity(seed_dir: Path) -> dict[str, float]:
    """Per layer: training-loss increase with only that layer INT8, ranked the way the QuantizationHook's keep_fp16
    ranks layers (qat_int8.yaml's spec, its sensitivity batches for calibration and loss, eval-mode model)."""
    path = seed_dir / "quant_sensitivity.json"
    if not path.is_file():
        print(f"== INT8 layer sensitivity of {seed_dir}/dense_ft", flush=True)
        cfg, sources = prepare_config(CONFIG, [], [QAT])
        recipe = compression_recipe(cfg, sources).quantization
        model, _, _ = load_compressed_model(CONFIG, str(seed_dir / "dense_ft" / "latest.pth"))
        loader = build_dataloader(build_dataset(cfg.data.train, "data.train", sources), cfg.data.samples_per_gpu, 0,
                                  False, cfg.get("seed"))
        batches = list(islice(loader, recipe.sensitivity_batches))

        def score(m: torch.nn.Module) -> float:
            with torch.no_grad():
                return -sum(float(training_loss(m, b)) for b in batches) / len(batches)

        path.write_text(json.dumps(dict(layer_sensitivity(model, recipe.spec, batches, eval_forward, score)), indent=2))
    return json.loads(path.read_text())


def prune_groups() -> dict[str, float]:
    """The module-path groups prune_seed.yaml prunes, with their ratios (the proportions every sweep method scales)."""
    return yaml.safe_load(Path(PRUNE).read_text())["compression"]["pruning"]["groups"]


def kept_ratios(checkpoint: Path) -> dict[str, float]:
    """Per prunable layer of the recipe's groups (auto-protected layers left out): kept / original out channels."""
    groups = prune_groups()
    dense, _, _ = load_for_analysis(CONFIG, None)
    pruned, _, _ = load_compressed_model(CONFIG, str(checkpoint))
    protected = {id(m) for m in protected_modules(dense, auto_protected(dense))}
    original = {n: c for n, m, c in channel_layers(dense) if owner(n, groups) and id(m) not in protected}
    now = {n: c for n, _, c in channel_layers(pruned)}
    return {n: now[n] / c for n, c in original.items()}


def sizes(run: Path) -> dict[str, int]:
    """Trainable params and FLOPs of a run's final model (as tools/report.py measures them)."""
    model, _, batch = load_compressed_model(CONFIG, str(run / "latest.pth"))
    params, flops = count_params_flops(model, batch)
    return {"params": params, "flops": flops}


def evaluation(run: Path, ptq: bool) -> dict[str, float]:
    """The headline metrics of the run's final evaluation, or of epoch 0 (the calibrated model) for PTQ."""
    records = read_jsonl(run / "metrics.jsonl")
    record = next(r for r in records if r["epoch"] == 0) if ptq else records[-1]
    return {k: record[k] for k in HEADLINE}


def seed_results(seed: int, nproc: int) -> dict[str, Any]:
    """Train (or reuse) every stage of one seed, then measure rows, sizes, kept channels and sensitivities."""
    seed_dir = RUNS / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    runs = {s.name: {**train(s, seed_dir, seed, nproc), "parent": s.parent} for s in stages()}
    for name, run in runs.items():
        run.update(sizes(seed_dir / name))
        run["pruning"] = (read_jsonl(seed_dir / name / "pruning_events.jsonl") or [None])[-1]
    rows = {}
    for row in ROWS:
        chain = epoch_chain(runs, runs[row.stage]["parent"] if row.ptq else row.stage)
        rows[row.label] = {"stage": row.stage, "ptq": row.ptq, "epoch_chain": chain, "budget_epochs": sum(chain),
                           **evaluation(seed_dir / row.stage, row.ptq), "params": runs[row.stage]["params"],
                           "flops": runs[row.stage]["flops"]}
    return {"stages": runs, "rows": rows,
            "kept_ratios": {s: kept_ratios(seed_dir / s / "latest.pth") for s in ("progressive", "oneshot")},
            "pruning_sensitivity": pruning_sensitivity(seed_dir), "quant_sensitivity": quant_sensitivity(seed_dir)}


def epoch_chain(runs: dict[str, dict], stage: str | None) -> list[int]:
    """Training epochs of each run behind a stage's final model, back through the checkpoints it was loaded from."""
    return [] if stage is None else [*epoch_chain(runs, runs[stage]["parent"]), runs[stage]["epochs"]]


def relative_change(per_seed: list[dict], label: str, other: str, metric: str) -> float:
    """Median over seeds of (label - other) / other, paired within each seed."""
    return statistics.median(rows[label][metric] / rows[other][metric] - 1 for rows in per_seed)


def medians(per_seed: list[dict]) -> dict[str, dict[str, Any]]:
    """Per row: the median of every metric and size over seeds, and the paired relative change vs its reference."""
    table = {}
    for row in ROWS:
        values = [rows[row.label] for rows in per_seed]
        entry = {k: statistics.median(v[k] for v in values) for k in (*METRICS, "params", "flops")}
        entry.update({k: values[0][k] for k in ("stage", "ptq", "epoch_chain", "budget_epochs")})
        ref = reference_of(per_seed[0], row.label)
        entry["reference"] = ref
        entry["vs_reference"] = {k: relative_change(per_seed, row.label, ref, k) for k in METRICS}
        table[row.label] = entry
    return table


def reference_of(rows: dict[str, dict], label: str) -> str:
    """The dense float row with the same training epochs as `label`."""
    budget = rows[label]["budget_epochs"]
    return next(r.label for r in ROWS if r.reference and rows[r.label]["budget_epochs"] == budget)


def budget_text(entry: dict[str, Any]) -> str:
    """Training epochs per run behind a row, e.g. `6+4+3`, and `+ calibration` for PTQ."""
    return "+".join(map(str, entry["epoch_chain"])) + (" + calibration" if entry["ptq"] else "")


def seed_diffs(per_seed: list[dict], ours: str, other: str, metric: str) -> list[float]:
    """Per seed, ours - other on metric (paired within the seed)."""
    return [rows[ours][metric] - rows[other][metric] for rows in per_seed]


def agreement(diffs: list[float]) -> str:
    """`better` / `worse` only when every seed agrees, else `inconclusive`."""
    return "better" if min(diffs) > 0 else "worse" if max(diffs) < 0 else "inconclusive"


def compare(per_seed: list[dict], ours: str, other: str, metric: str) -> str:
    """`beats` / `is behind` only when every seed agrees, else `is inconclusive against`; with the numbers behind it."""
    diffs = seed_diffs(per_seed, ours, other, metric)
    ahead = sum(d > 0 for d in diffs)
    verb = {"better": "beats", "worse": "is behind", "inconclusive": "is inconclusive against"}[agreement(diffs)]
    return (f"{verb} {other} on {metric} (median {statistics.median(diffs):+.4f}, per seed {min(diffs):+.4f} to "
            f"{max(diffs):+.4f}, ahead in {ahead}/{len(diffs)} seeds)")


def verdict_pruning(per_seed: list[dict], table: dict[str, dict]) -> str:
    """Progressive vs one-shot pruning at the same target ratio and training budget."""
    one, prog = VERDICT_ROWS[:2]
    dense = table[table[prog]["reference"]]["params"]
    cut = {k: 1 - table[k]["params"] / dense for k in (prog, one)}
    return (f"**Progressive vs one-shot pruning** (same {PRUNE} target, params -{cut[prog]:.1%} vs -{cut[one]:.1%}; "
            f"same budget {budget_text(table[prog])} epochs): progressive pruning "
            + " and ".join(compare(per_seed, prog, one, m) for m in ("det/NDS", "seg/mIoU")) + ".")


def verdict_qat(per_seed: list[dict], table: dict[str, dict]) -> str:
    """Prune + QAT against the seed plan's 3 % limit, vs the same-budget FP32 model and vs the 6-epoch baseline."""
    label = VERDICT_ROWS[3]
    ours = table[label]
    change = ours["vs_reference"]
    worst_seed = {k: min(rows[label][k] / rows[ours["reference"]][k] - 1 for rows in per_seed) for k in METRICS}
    worst = min(change.values())
    within = worst >= -LIMIT
    status = "stays within" if within else f"does NOT stay within ({-worst - LIMIT:.1%} beyond it at worst)"
    base = table["baseline (from scratch)"]
    vs_base = ", ".join(f"{k} {ours[k] / base[k] - 1:+.1%}" for k in METRICS)
    return (f"**Progressive pruning + INT8 QAT** {status} the {LIMIT:.0%} limit against the same-budget dense FP32 "
            f"model ({budget_text(ours)} epochs, '{ours['reference']}'): "
            + ", ".join(f"{k} {v:+.1%}" for k, v in change.items())
            + " (median of per-seed relative changes; worst single seed: "
            + ", ".join(f"{k} {v:+.1%}" for k, v in worst_seed.items())
            + f"). Against the {budget_text(base)}-epoch baseline it was "
            f"compressed from (medians): {vs_base}.")


def table_markdown(table: dict[str, dict]) -> str:
    """The median table: metrics, sizes, budget and the relative change vs the same-budget dense FP32 row."""
    lines = ["| stage | training epochs | det/NDS* | det/mAP | seg/mIoU | params | GFLOPs | vs same-budget dense FP32 "
             "(NDS / mAP / mIoU) |", "|---|---|---|---|---|---|---|---|"]
    for label, e in table.items():
        change = "reference" if e["reference"] == label else " / ".join(f"{v:+.1%}" for v in e["vs_reference"].values())
        lines.append(f"| {label} | {budget_text(e)} | {e['det/NDS']:.3f} | {e['det/mAP']:.3f} | {e['seg/mIoU']:.3f} | "
                     f"{e['params'] / 1e6:.3f} M | {e['flops'] / 1e9:.2f} | {change} |")
    return "\n".join(lines)


def per_seed_markdown(per_seed: dict[int, dict], labels: tuple[str, ...]) -> str:
    """NDS / mIoU of the rows the verdicts compare, seed by seed (the medians above hide how much seeds differ)."""
    lines = ["| seed | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for seed, result in per_seed.items():
        rows = result["rows"]
        lines.append(f"| {seed} | " + " | ".join(f"{rows[k]['det/NDS']:.3f} / {rows[k]['seg/mIoU']:.3f}"
                                                  for k in labels) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any], pngs: dict[str, Path]) -> str:
    """The README section: method, median table, the two verdicts and the plots."""
    table, seeds = result["medians"], result["seeds"]
    minutes = sum(s["seconds"] for r in result["per_seed"].values() for s in r["stages"].values()) / 60
    images = "\n\n".join(f"![{name}](results/{path.name})" for name, path in pngs.items())
    return f"""## Quality at equal budget: one-shot vs progressive pruning, PTQ, QAT (`quality.py`)

The `tiny` model on the synthetic scenes of `{CONFIG}` (the demo's data: same scenes for every seed), training seeds
{", ".join(map(str, seeds))} (the config's `seed`: initialisation and data order). Every stage is a real 2-rank run
(`torchpack dist-run -np {result['np']} python tools/train_compressed.py ...`, at nice 19) into
`benchmarks/runs/quality/seed<k>/<stage>/`; {minutes:.0f} min of training in all on this shared 2-core machine.
The baseline trains from scratch; every other model starts from it. Dense fine-tune, one-shot and progressive pruning
all train {PRUNE}'s epochs and LR schedule (the dense one with its `compression:` section removed); both pruning runs
use its target and group ratios with `round_to` 4 (as the demo): one-shot removes everything in a single event at
iteration 0, progressive spreads the recipe's events over its first epochs. PTQ is the ModelOpt calibration of
{QAT}, scored at epoch 0 of the QAT run before any training; it is measured on both the dense fine-tuned model (the
INT8 cost alone) and the progressive-pruned one. QAT trains {QAT}'s epochs; its same-budget reference is the dense
fine-tuned model trained the same extra epochs with the same optimizer and LR schedule in FP32 (no quantizers, no BN
freeze). Numbers are medians over seeds; the last column is the median over seeds of each row's relative change
against the dense FP32 row with the same training epochs (paired by seed). *NDS over the synthetic data's
true-positive metrics (ATE, ASE, AOE). All per-seed numbers and commands: `results/quality.json`.

{table_markdown(table)}

Per seed, NDS* / mIoU of the compared rows:

{per_seed_markdown(result['per_seed'], VERDICT_ROWS)}

{result['verdicts']['pruning']}

{result['verdicts']['qat']}

{images}
"""


def main() -> None:
    """Run (or resume) every seed, then write results/quality.{json,md} and the plots."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2, with --sweep 0 1 2 3 4")
    parser.add_argument("--np", type=int, default=2, help="ranks per training run")
    parser.add_argument("--fresh", action="store_true", help="re-run every stage of these seeds")
    parser.add_argument("--sweep", action="store_true", help="the accuracy-vs-params sweep instead (quality_sweep.py)")
    parser.add_argument("--jobs", type=int, default=2, help="--sweep: training runs at a time")
    parser.add_argument("--report-only", action="store_true", help="--sweep: only write the report of finished runs")
    args = parser.parse_args()
    os.nice(19)
    os.chdir(ROOT)  # the CLIs and the config loader take paths relative to the repository
    if args.sweep:
        from quality_sweep import SEEDS, sweep  # it imports this module's stage and comparison helpers

        return sweep(args.seeds or list(SEEDS), args.np, args.jobs, args.report_only)
    args.seeds = args.seeds or [0, 1, 2]
    tic = time.perf_counter()
    if args.fresh:
        for seed in args.seeds:
            shutil.rmtree(RUNS / f"seed{seed}", ignore_errors=True)
    per_seed = {seed: seed_results(seed, args.np) for seed in args.seeds}
    rows = [r["rows"] for r in per_seed.values()]
    table = medians(rows)
    result = {"seeds": args.seeds, "np": args.np, "config": CONFIG, "medians": table, "per_seed": per_seed,
              "verdicts": {"pruning": verdict_pruning(rows, table), "qat": verdict_qat(rows, table)}}
    pngs = {"accuracy vs FLOPs": plot_tradeoff(table, rows),
            "kept channels per layer": plot_kept_ratios([r["kept_ratios"] for r in per_seed.values()], prune_groups()),
            "sensitivity": plot_sensitivity([r["quant_sensitivity"] for r in per_seed.values()],
                                            [r["pruning_sensitivity"] for r in per_seed.values()])}
    result["wall_seconds"] = round(time.perf_counter() - tic, 1)
    print("saved", save("quality", result), write_section("quality", markdown(result, pngs)))
    print(table_markdown(table), result["verdicts"]["pruning"], result["verdicts"]["qat"], sep="\n\n")


if __name__ == "__main__":
    main()
