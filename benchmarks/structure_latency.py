"""Latency bought per parameter removed, by pruning kind, on the `full` model: whole blocks (depth), whole attention
heads, and channels at the SAME params reduction as each depth / head structure. Every structure is pruned in one
shot with the core API, exported (FP32 ONNX parts, as deploy_latency.py does), timed in onnxruntime on this CPU with
the structures alternating part by part in every round, and projected to the Orin by the export report's roofline.

    .venv/bin/python benchmarks/structure_latency.py [--repeats 8] [--scene reference] [--cameras 6]

About 15 min on this shared 2-core CPU at the defaults (BEVFusion's 6 cameras at the tests' 96x160 images and
64x64 BEV grid); `--scene bevfusion` takes BEVFusion's input sizes and is several times slower.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import figure, machine, save, write_section
from deploy_latency import (
    BEVFUSION_CAMERAS,
    SCENES,
    batches,
    checks,
    export,
    lap,
    projection,
    prune,
    recipes,
    resolution,
    table,
    time_parts,
)
from mmcv import Config

from bevfusion_ext.compression import pruning as core
from bevfusion_ext.compression.pruning.counting import trainable_params
from bevfusion_ext.compression.recipe import PruningRecipe
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.models.config import SCENE

SWIN = "encoders.camera.backbone.stages"
SECOND = "decoder.backbone.blocks"
DECODER = "heads.object"
# Depth levels (blocks left per list): the seed plan's Swin stage 2 6 -> 4 with one SECOND conv per stage
# (configs/compression/prune_structure.yaml), then deeper. The `full` TransFusion head has one decoder layer, which
# must stay.
DEPTH = {
    "depth-1": {f"{SWIN}.2": 4, f"{SECOND}.0": 4, f"{SECOND}.1": 4},
    "depth-2": {f"{SWIN}.2": 2, f"{SWIN}.3": 1, f"{SECOND}.0": 2, f"{SECOND}.1": 2},
}
# Head levels (heads left per Swin stage and in the TransFusion decoder): the seed plan's 8 -> 6 (3/4 of every
# attention's heads), then about half. A head takes its width of the residual stream it reads with it.
HEADS = {
    "heads-1": {f"{SWIN}.0": 2, f"{SWIN}.1": 4, f"{SWIN}.2": 8, f"{SWIN}.3": 16, DECODER: 6},
    "heads-2": {f"{SWIN}.0": 2, f"{SWIN}.1": 3, f"{SWIN}.2": 6, f"{SWIN}.3": 12, DECODER: 4},
}
# Pruning decisions are traced on a smaller camera batch: params do not depend on it, magnitude importance and the
# structure do not either, and every probe of the channel twins' scale search traces the whole model. (At 1 camera
# the channel planner of the `full` model fails inside Torch-Pruning's importance indexing, hence 2.)
PLAN_CAMERAS = 2
KINDS = {"dense": "dense", "depth": "depth (whole blocks)", "heads": "heads (whole attention heads)",
         "channel": "channels (seed recipe groups)"}
# x86 takes a slow path on denormal floats, which the Orin's GPU does not: with random weights (zero biases) the
# attention output of Swin's shifted-window blocks over padded windows is 25-54 % denormal at the default scene, and
# their proj MatMul then takes 70-300 ms instead of about 1 (the dense camera.backbone: 0.9 s vs 0.28 s flushed).
DENORMALS = {True: "denormals flushed to zero on the timing thread (FTZ/DAZ): with random weights Swin's "
                   "shifted-window attention produces them, and x86's slow path on them, which the Orin's GPU does not "
                   "have, would dominate the camera backbone; `--keep-denormals` times them",
             False: "denormals NOT flushed: x86's denormal slow path is in these numbers"}
START = time.perf_counter()


def kind(name: str) -> str:
    """A structure's pruning kind from its name (dense, depth-k, heads-k, channel@<other>)."""
    return name.split("@")[0] if "@" in name else name.split("-")[0]


def structural(dense: torch.nn.Module, batch: dict, recipe: PruningRecipe, depth: dict[str, int],
               heads: dict[str, int]) -> tuple[torch.nn.Module, dict]:
    """A copy with only blocks / heads removed (no channel ratios), through plan_pruning + apply_pruning."""
    paths = list(depth or heads)
    counts = core.block_counts if depth else core.head_counts
    history = core.plan_pruning(dense, batch, recipe.spec(), {}, depth=depth, heads=heads)
    pruned = copy.deepcopy(dense)
    core.apply_pruning(pruned, batch, history)
    return pruned, {"targets": depth or heads, "before": counts(dense, paths), "after": counts(pruned, paths),
                    "steps": len(history)}


def build_structures(dense: torch.nn.Module, batch: dict, recipe: PruningRecipe,
                     phases: dict[str, float]) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """Dense, every depth and head level, and for each of those the channel-only copy at its params reduction."""
    models, info = {"dense": dense}, {"dense": {}}
    base = trainable_params(dense)
    for name, targets in [*((n, (t, {})) for n, t in DEPTH.items()), *((n, ({}, t)) for n, t in HEADS.items())]:
        models[name], info[name] = structural(dense, batch, recipe, *targets)
        reduction = 1.0 - trainable_params(models[name]) / base
        pair = f"channel@{name}"
        models[pair], info[pair] = prune(dense, batch, dataclasses.replace(recipe, params_reduction=reduction))
        info[pair]["params_target"] = reduction
        lap(phases, f"prune_{name}")
    return models, info


def frames_ms(samples: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per structure, the frame time of every round in ms: the sum of its parts timed in that round."""
    return {s: [1e3 * sum(run) for run in zip(*parts.values(), strict=True)] for s, parts in samples.items()}


def summarize(models: dict[str, torch.nn.Module], info: dict[str, dict], reports: dict[str, dict],
              samples: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Per structure: params, GFLOPs, ORT and projected Orin ms per part and per frame, per-round frame ms."""
    base, frames = trainable_params(models["dense"]), frames_ms(samples)
    result = {}
    for name, model in models.items():
        parts = reports[name]["parts"]
        orin = {p: projection(e) for p, e in parts.items()}
        params = trainable_params(model)
        result[name] = {
            "kind": kind(name), "params": params, "params_removed": 1.0 - params / base, **info[name],
            "gflops": sum(e["gflops"] for e in parts.values()),
            "ort_ms": statistics.median(frames[name]), "ort_round_ms": frames[name],
            "orin_ms": sum(o["projected_ms"] for o in orin.values()),
            "parts": {p: {"gflops": e["gflops"], "ort_ms": 1e3 * statistics.median(samples[name][p]),
                          "orin": orin[p]} for p, e in parts.items()},
        }
    return result


def per_percent(saved_ms: float, removed: float) -> float:
    """Milliseconds saved per percentage point of params removed."""
    return saved_ms / (100.0 * removed)


def slopes(structures: dict[str, dict]) -> dict[str, dict]:
    """Per pruned structure: ORT ms saved per % params (median over rounds, and each round against the dense model
    of that round), projected Orin ms and GFLOPs saved per %."""
    dense = structures["dense"]
    out = {}
    for name, s in structures.items():
        if name == "dense":
            continue
        rounds = [per_percent(d - m, s["params_removed"])
                  for d, m in zip(dense["ort_round_ms"], s["ort_round_ms"], strict=True)]
        out[name] = {"ort_ms_per_pct": statistics.median(rounds), "ort_ms_per_pct_rounds": rounds,
                     "orin_ms_per_pct": per_percent(dense["orin_ms"] - s["orin_ms"], s["params_removed"]),
                     "gflops_per_pct": per_percent(dense["gflops"] - s["gflops"], s["params_removed"])}
    return out


def claim(name: str, rates: dict[str, dict]) -> dict:
    """Structure `name` vs its channel-only twin at equal params, in words: ORT judged round by round (inconclusive
    when the per-round difference changes sign), the projection (no noise) by its value."""
    mine, twin = rates[name], rates[f"channel@{name}"]
    diffs = [a - b for a, b in zip(mine["ort_ms_per_pct_rounds"], twin["ort_ms_per_pct_rounds"], strict=True)]
    label, wins = kind(name), sum(d > 0 for d in diffs)
    ort_line = (f"ORT: {label} saves {mine['ort_ms_per_pct']:.2f} ms per % params removed vs channel "
                f"{twin['ort_ms_per_pct']:.2f} (per-round difference {min(diffs):+.2f} to {max(diffs):+.2f} ms/%, "
                f"{label} ahead in {wins}/{len(diffs)} rounds): ")
    if min(diffs) > 0 or max(diffs) < 0:
        ort_line += f"{label} buys {'more' if min(diffs) > 0 else 'less'} latency per parameter than channels"
    else:
        ort_line += "inconclusive (the difference lies within the round-to-round spread)"
    a, b = mine["orin_ms_per_pct"], twin["orin_ms_per_pct"]
    orin_line = (f"projected Orin: {label} saves {a:.3f} ms per % vs channel {b:.3f}: "
                 f"{label} buys {'more' if a > b else 'less'} projected latency per parameter "
                 f"({a / b:.2f}x channel's)" if b > 0 else f"projected Orin: {label} {a:.3f} vs channel {b:.3f} ms/%")
    return {"structure": name, "ort": ort_line, "orin": orin_line, "ort_round_diffs": diffs,
            "ort_conclusive": min(diffs) > 0 or max(diffs) < 0}


def kind_ranges(rates: dict[str, dict]) -> str:
    """ms saved per % params by kind across its levels, ORT and projected Orin."""
    lines = []
    for k in ("depth", "heads", "channel"):
        mine = [r for n, r in rates.items() if kind(n) == k]
        ort_ms = [r["ort_ms_per_pct"] for r in mine]
        orin_ms = [r["orin_ms_per_pct"] for r in mine]
        lines.append(f"- {KINDS[k]}: ORT {min(ort_ms):.2f} to {max(ort_ms):.2f} ms per % params, projected Orin "
                     f"{min(orin_ms):.3f} to {max(orin_ms):.3f} ms per % ({len(mine)} structures)")
    return "\n".join(lines)


def structure_table(structures: dict[str, dict], rates: dict[str, dict]) -> str:
    """One row per structure: params removed, GFLOPs, ORT and projected Orin frame ms, saved per % params."""
    rows = []
    for name, s in structures.items():
        r = rates.get(name)
        spread = f"{min(s['ort_round_ms']):.0f}-{max(s['ort_round_ms']):.0f}"
        rows.append([name, KINDS[s["kind"]], f"{s['params'] / 1e6:.2f}", f"{100 * s['params_removed']:.1f}",
                     f"{s['gflops']:.1f}", f"{s['ort_ms']:.0f} ({spread})", f"{s['orin_ms']:.2f}",
                     f"{r['ort_ms_per_pct']:.2f}" if r else "", f"{r['orin_ms_per_pct']:.3f}" if r else "",
                     f"{r['gflops_per_pct']:.2f}" if r else ""])
    header = ["structure", "kind", "params (M)", "params removed %", "GFLOPs", "ORT ms (round min-max)",
              "projected Orin ms", "ORT ms saved / %", "Orin ms saved / %", "GFLOPs saved / %"]
    return table(header, rows)


def parts_table(structures: dict[str, dict]) -> str:
    """ORT ms / projected Orin ms of every part per structure: where each kind's savings come from."""
    parts = list(structures["dense"]["parts"])
    rows = [[name, *(f"{s['parts'][p]['ort_ms']:.0f} / {s['parts'][p]['orin']['projected_ms']:.2f}" for p in parts)]
            for name, s in structures.items()]
    return table(["structure", *parts], rows)


def changes(structures: dict[str, dict]) -> str:
    """What each depth / head structure removed and the scale each channel twin needed, in words."""
    lines = []
    for name, s in structures.items():
        if "before" in s:
            counts = ", ".join(f"{p} {s['before'][p]} -> {s['after'][p]}" for p in s["targets"])
            lines.append(f"- `{name}`: {counts}")
        elif "scale" in s:
            ratios = ", ".join(f"{g} {100 * r:.0f} %" for g, r in s["ratios"].items())
            lines.append(f"- `{name}`: channels only, group scale {s['scale']:.2f} for -{100 * s['params_target']:.1f}"
                         f" % params ({ratios})")
    return "\n".join(lines)


def method(result: dict) -> str:
    """The method paragraph: model, scene, pruning, export, timing protocol, machine load."""
    m, res = result["machine"], result["resolution"]
    return (
        f"`full` reference model (random weights, seed 0; latency depends on the structure only) at "
        f"{res['cameras']} camera(s) x {res['image'][0]}x{res['image'][1]} ({result['scene']} scene), fused BEV "
        f"{res['bev_grid']}x{res['bev_grid']}, map grid {res['map_grid']}x{res['map_grid']}. Each structure is pruned "
        f"in one shot from the dense model with the core API (`plan_pruning` + `apply_pruning`; depth: block "
        f"influence, heads: per-head magnitude; channel twins: `scale_for_target` at the depth / head structure's "
        f"measured params reduction, within its 1-point tolerance, groups and magnitude importance of "
        f"`configs/compression/prune_seed.yaml`, round_to 8), each decision traced on a "
        f"{result['plan_cameras']}-camera batch (params and magnitude ranks do not depend on the batch). "
        f"{result['decoder_note']} Every structure exported unquantized with `export_bundle` (FP32 ONNX of each "
        f"part; BatchNorms folded; {checks(result)}). Latency: onnxruntime {result['onnxruntime']} on CPU "
        f"({m['cpu']}, {m['cores']} cores, intra-op threads {result['ort_intra_op_threads']}, sequential, "
        f"{DENORMALS[result['denormals_flushed']]}), all {len(result['structures'])} structures alternating part by "
        f"part within each of "
        f"{result['repeats']} rounds after one warm-up run; a frame is the sum of its parts in one round; the median "
        f"over rounds is reported, and per-round savings are taken against the dense frame of the same round. Load "
        f"average {result['load_average_at_start']:.1f} at the start and {result['load_average_at_end']:.1f} at the "
        f"end (other jobs on this machine). Projected Orin: the export report's roofline per part, **FP16** (the "
        f"models are unquantized, so the report has no INT8 projection), DLA parts at the partition plan's DLA/GPU "
        f"split, GPU parts on the GPU, summed over parts: a lower bound, not a measurement. GFLOPs: the export's "
        f"ONNX layer counter summed over parts."
    )


def markdown(result: dict, plot: Path) -> str:
    """The README section: method, structures, the tables, the claims and the plot."""
    structures, rates = result["structures"], result["rates"]
    claims = "\n".join(f"- **{c['structure']} vs channel@{c['structure']}** (equal params): {c['ort']}; "
                       f"{c['orin']}." for c in result["claims"])
    return f"""## Latency per params removed: depth vs heads vs channels at equal params (`structure_latency.py`)

{method(result)}

Structures:

{changes(structures)}

{structure_table(structures, rates)}

Per part, ORT ms / projected Orin ms:

{parts_table(structures)}

Latency saved per 1 % of params removed:

{kind_ranges(rates)}

What the numbers support, pair by pair at equal params:

{claims}

![latency vs params removed](results/{plot.name})

(`results/structure_latency.json`)
"""


def plot(structures: dict[str, dict]) -> Path:
    """Frame latency vs params removed, one marker per kind, ORT (measured) and projected Orin side by side."""
    fig, axes, path = figure("structure_latency", ncols=2, figsize=(13, 5))
    markers = {"dense": ("k", "*"), "depth": ("tab:red", "^"), "heads": ("tab:green", "s"),
               "channel": ("tab:blue", "o")}
    for ax, key, title in ((axes[0], "ort_ms", "Measured: FP32 onnxruntime on this CPU (median, round min-max)"),
                           (axes[1], "orin_ms", "Projected (roofline, FP16, not measured): Orin")):
        for k, (color, marker) in markers.items():
            mine = [s for s in structures.values() if s["kind"] == k]
            x = [100 * s["params_removed"] for s in mine]
            y = [s[key] for s in mine]
            err = None
            if key == "ort_ms":
                err = np.array([[s[key] - min(s["ort_round_ms"]), max(s["ort_round_ms"]) - s[key]] for s in mine]).T
            ax.errorbar(x, y, yerr=err, fmt=marker, color=color, markersize=9, capsize=3, label=KINDS[k])
        for name, s in structures.items():
            if "@" in name:
                twin = structures[name.split("@")[1]]
                ax.plot([100 * s["params_removed"], 100 * twin["params_removed"]], [s[key], twin[key]], ":",
                        color="gray", linewidth=1)
        ax.set_xlabel("params removed (%)")
        ax.set_ylabel("ms per frame")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("dotted: a depth / head structure and its channel-only twin at equal params", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main() -> None:
    """Build every structure, export it, time all of them alternately, then report, claim and plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scene", default="reference", choices=SCENES, help="input sizes: the tests' or BEVFusion's")
    parser.add_argument("--cameras", type=int, default=BEVFUSION_CAMERAS)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--ort-threads", type=int, default=1,
                        help="onnxruntime intra-op threads (default 1: on a loaded machine 2 threads stall each other)")
    parser.add_argument("--keep-denormals", action="store_true", help="time without flushing denormals (see above)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    torch.manual_seed(0)
    recipe, _ = recipes()
    config = reference_config("full", **SCENES[args.scene])
    batch, plan_batch = (batches(args.scene, cameras, 1)[0] for cameras in (args.cameras, PLAN_CAMERAS))
    phases: dict[str, float] = {}
    dense = build_model(config).eval()
    decoder_layers = core.block_counts(dense, [DECODER])[DECODER]
    models, info = build_structures(dense, plan_batch, recipe, phases)
    cfg = Config(dict(model=config, object_classes=list(SCENE["object_classes"]),
                      map_classes=list(SCENE["map_classes"])))
    with tempfile.TemporaryDirectory() as tmp:
        reports, failures = {}, {}
        for name, model in models.items():
            source = {"config": f"reference_config('full'), {args.scene} scene", "checkpoint": f"(in memory, {name})",
                      "pruning_events": int(name != "dense")}
            reports[name], failures[name] = export(model, cfg, batch, Path(tmp) / name, source)
        lap(phases, "export")
        onnx = {(s, p): Path(tmp) / s / e["files"]["onnx"] for s in models for p, e in reports[s]["parts"].items()}
        flushed = not args.keep_denormals and torch.set_flush_denormal(True)  # the timing thread runs onnxruntime
        samples = time_parts(onnx, args.repeats, args.ort_threads)
        torch.set_flush_denormal(False)
        lap(phases, "onnxruntime_timing")
    structures = summarize(models, info, reports, samples)
    rates = slopes(structures)
    result = {
        "size": "full", "scene": args.scene, "resolution": resolution(args.scene, "full", args.cameras),
        "plan_cameras": PLAN_CAMERAS, "repeats": args.repeats, "onnxruntime": ort.__version__,
        "ort_intra_op_threads": args.ort_threads, "denormals_flushed": flushed,
        "orin_precision": "fp16", "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0],
        "decoder_note": f"The `full` TransFusion head has {decoder_layers} decoder layer(s): "
                        + ("none can go (one must stay), so depth pruning there is not measured."
                           if decoder_layers <= 1 else "decoder layers are not removed here."),
        "export_check_failures": failures, "structures": structures, "rates": rates,
        "claims": [claim(name, rates) for name in [*DEPTH, *HEADS]], "phase_seconds": phases,
    }
    figure_path = plot(structures)
    result["wall_seconds"] = time.perf_counter() - START
    print(save("structure_latency", result),
          write_section("structure_latency", markdown({"machine": machine(), **result}, figure_path)))
    for c in result["claims"]:
        print(c["ort"], "|", c["orin"])
    print(f"{result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
