"""Cost of compression in the training loop vs model size (issue 6): the `full` reference model at several channel
widths, its FP32 vs ModelOpt fake-quant training step, and one pruning event's time and peak memory.

Steps alternate FP32 / fake-quant in this process; each pruning event runs in a fresh process (prune_event.py), the
widths in turn per repeat, so every event's peak RSS is its own and load drifts spread over all widths.

    .venv/bin/python benchmarks/cost_scaling.py [--widths 0.25 0.5 0.75 1.0] [--repeats 7] [--events 5] [--threads 1]
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from common import figure, full_at_width, machine, save, synthetic_batch, threads_option, width_knobs, write_section
from qat_step import alternate, fake_quant_copy

from bevfusion_ext.models import build_model

PRUNE_EVENT = Path(__file__).resolve().parent / "prune_event.py"
BACKEND = "modelopt"


def step_samples(width: float, repeats: int) -> dict[str, list[float]]:
    """Per-repeat seconds of the FP32 and the calibrated fake-quant training step at batch 1."""
    torch.manual_seed(0)
    batch = synthetic_batch(1)
    fp32 = build_model(full_at_width(width))
    return alternate({"fp32": fp32, "fake_quant": fake_quant_copy(fp32, batch, BACKEND)}, batch, repeats)


def event_in_subprocess(width: float, ratio: float, threads: int) -> dict:
    """One pruning event in a fresh process, so VmHWM measures this event and nothing before it."""
    cmd = [sys.executable, str(PRUNE_EVENT), "--width", str(width), "--ratio", str(ratio), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y vs log x: cost ~ size^slope (nan if a cost is not positive)."""
    if min(ys) <= 0:
        return float("nan")
    return statistics.linear_regression([math.log(x) for x in xs], [math.log(y) for y in ys]).slope


def summarize(width: float, steps: dict[str, list[float]], events: list[dict]) -> dict:
    """Medians per width; params and FLOPs are those of the model before the event (deterministic)."""
    fp32, fq = statistics.median(steps["fp32"]), statistics.median(steps["fake_quant"])
    phases = {p: statistics.median(e["seconds"][p] for e in events) for p in events[0]["seconds"]}
    before = statistics.median(e["peak_rss_mb_before_event"] for e in events)
    after = statistics.median(e["peak_rss_mb_after_event"] for e in events)
    return {"width": width, "params": events[0]["params"][0], "flops": events[0]["flops"][0], "fp32_step_s": fp32,
            "fake_quant_step_s": fq, "ratio": fq / fp32, "event_phase_s": phases,
            "event_s": statistics.median(e["total_seconds"] for e in events), "peak_rss_mb_before": before,
            "peak_rss_mb_after": after, "peak_rss_increase_mb": after - before}


def exponents(rows: list[dict]) -> dict[str, float]:
    """How each cost grows with params over the measured widths."""
    params = [r["params"] for r in rows]
    keys = ("flops", "fp32_step_s", "fake_quant_step_s", "event_s", "peak_rss_increase_mb")
    return {k: exponent(params, [r[k] for r in rows]) for k in keys}


def plain_log_ticks(*axes: Any) -> None:
    """Log axes ticked at 1, 2, 5 x 10^k with plain numbers, readable over the one or two decades measured."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    for axis in [a for ax in axes for a in (ax.xaxis, ax.yaxis)]:
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_locator(NullLocator())


def plot(rows: list[dict]) -> Path:
    """Step times, and pruning-event time and extra peak memory, against params (log-log)."""
    fig, (steps, event), path = figure("cost_scaling", ncols=2, figsize=(11, 4.2))
    params = [r["params"] / 1e6 for r in rows]
    steps.loglog(params, [r["fp32_step_s"] for r in rows], "o-", label="FP32")
    steps.loglog(params, [r["fake_quant_step_s"] for r in rows], "s-", label=f"fake-quant ({BACKEND})")
    steps.set(xlabel="params (M)", ylabel="training step (s, median)", title="Training step, batch 1")
    steps.legend()
    event.loglog(params, [r["event_s"] for r in rows], "o-", color="C2")
    event.set(xlabel="params (M)", title="One pruning event (medians)")
    event.set_ylabel("event time (s)", color="C2")
    memory = event.twinx()
    memory.loglog(params, [r["peak_rss_increase_mb"] / 1024 for r in rows], "s--", color="C3")
    memory.set_ylabel("peak RSS increase (GB)", color="C3")
    plain_log_ticks(steps, event, memory)
    for ax in (steps, event):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def section(result: dict) -> str:
    """The README section: method, the table, the phase split, the plot and the growth exponents."""
    rows, exp = result["rows"], result["exponents"]
    table = "\n".join(
        f"| {r['width']:g} | {r['params'] / 1e6:.2f} M | {r['flops'] / 1e9:.1f} G | {r['fp32_step_s']:.2f} s "
        f"| {r['fake_quant_step_s']:.2f} s | {r['ratio']:.2f}x | {r['event_s']:.2f} s "
        f"| {r['peak_rss_mb_before'] / 1024:.2f} -> {r['peak_rss_mb_after'] / 1024:.2f} GB |" for r in rows)
    phases = "\n".join(f"| {r['width']:g} | " + " | ".join(f"{s:.2f}" for s in r["event_phase_s"].values()) + " |"
                       for r in rows)
    load = result["load_average_1min"]
    return f"""## Cost in the loop vs model width (`cost_scaling.py`)

The `full` reference model with every channel knob times a width multiplier (Swin embed dims rounded to a multiple
of 24, the others to 8; depths, head counts and the scene unchanged, so every width has the same modules and
quantizers; width 1 is the 43.6 M-parameter model), batch 1.
**Step**: the FP32 model and a ModelOpt fake-quant copy (calibrated on the same batch) take AdamW steps in turn in
one process, one warmup each, median of {result['repeats']} steps each; the ratio is of those medians. **Pruning
event**: what the ProgressivePruningHook does per event (1 rank, gloo) after one AdamW step, removing
{result['ratio_per_group']:.0%} of each group's channels (backbone, neck, decoder, heads; `round_to` 8); each event
runs in its own process, medians of {result['events']} processes per width. Peak RSS is the process's VmHWM after
building and one training step (before) and after the event. FLOPs are counted on the batch. The machine was shared
(1-min load average {min(load):.1f}-{max(load):.1f} on its {machine()['cores']} cores during the run), so torch ran
with `--threads {result['threads']}`: with 2 threads, a job on the other core stalls every op's thread barrier.

| width | params | FLOPs | FP32 step | fake-quant step | ratio | pruning event | peak RSS before -> after |
|---|---|---|---|---|---|---|---|
{table}

| width | importance + plan (s) | apply (s) | DDP rebuild (s) | optimizer surgery (s) |
|---|---|---|---|---|
{phases}

![Step time and pruning-event cost vs params](results/cost_scaling.png)

Growth with size (least-squares slope of log cost vs log params over the {len(rows)} widths): FP32 step
params^{exp['fp32_step_s']:.2f}, fake-quant step params^{exp['fake_quant_step_s']:.2f}, pruning event
params^{exp['event_s']:.2f}, its extra peak memory params^{exp['peak_rss_increase_mb']:.2f}; FLOPs themselves grow
as params^{exp['flops']:.2f}. The fake-quant / FP32 ratio is {rows[0]['ratio']:.2f}x at width {rows[0]['width']:g}
and {rows[-1]['ratio']:.2f}x at width {rows[-1]['width']:g}. (`results/cost_scaling.json` has every repeat.)
"""


def main() -> None:
    """Measure every width, then write the JSON, the plot and the README section."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--repeats", type=int, default=7, help="timed training steps per model and width")
    parser.add_argument("--events", type=int, default=5, help="pruning events (fresh processes) per width")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of each group's channels an event removes")
    threads_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    widths = sorted(args.widths)
    load = [os.getloadavg()[0]]
    steps = {}
    for w in widths:
        steps[w] = step_samples(w, args.repeats)
        load.append(os.getloadavg()[0])
        print(f"width {w:g}: steps {steps[w]}", flush=True)
    events = {w: [] for w in widths}
    for _ in range(args.events):
        for w in widths:
            events[w].append(event_in_subprocess(w, args.ratio, args.threads))
            load.append(os.getloadavg()[0])
            print(f"width {w:g}: event {events[w][-1]}", flush=True)
    rows = [summarize(w, steps[w], events[w]) for w in widths]
    result = {"backend": BACKEND, "batch": 1, "threads": args.threads, "repeats": args.repeats, "events": args.events,
              "ratio_per_group": args.ratio, "load_average_1min": load, "rows": rows, "exponents": exponents(rows),
              "samples": [{"width": w, "knobs": width_knobs(w), "step_seconds": steps[w], "events": events[w]}
                          for w in widths]}
    print(json.dumps({k: result[k] for k in ("rows", "exponents")}, indent=1))
    print("saved", save("cost_scaling", result), plot(rows), write_section("cost_scaling", section(result)))


if __name__ == "__main__":
    main()
