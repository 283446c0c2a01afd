"""Deployed compute of the `full` model, dense vs pruned at the seed recipe: FP32 onnxruntime latency of every exported
part on this CPU (structural speedup against the FLOPs ratio) and the export report's roofline projection of the Orin
latency per part (INT8 where quantized, DLA/GPU placement from the partition plan) against the seed's targets.

    .venv/bin/python benchmarks/deploy_latency.py [--repeats 10] [--size full] [--scene bevfusion] [--cameras 6]

The default is BEVFusion's rig of 6 cameras (about 20 min on this 2-core CPU); `--cameras 1` takes half that, and its
per-frame projection is also given extrapolated to 6 cameras (camera.backbone's projection scaled by the batch).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import yaml
from common import ROOT, figure, machine, median_seconds, save, write_section
from mmcv import Config

from bevfusion_ext.compression import pruning as core
from bevfusion_ext.compression import quantization as quant
from bevfusion_ext.compression.analysis import eval_forward
from bevfusion_ext.compression.recipe import PruningRecipe, QuantizationRecipe, parse_recipe
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.export.parts import PARTS, unavailable_reason
from bevfusion_ext.export.pipeline import ExportOptions, check_failures, export_bundle
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.models.config import SCENE, SIZES

CONFIGS = ROOT / "configs" / "compression"
# BEVFusion's nuScenes camera + lidar setup (configs/nuscenes/default.yaml + det/seg): cameras of 256 x 704, a
# +-54 m range, camera BEV at 0.3 m pooled 2x to the 180 x 180 fused BEV grid (0.6 m), map head on a 200 x 200 grid
# (+-50 m at 0.5 m), depth bins 1-60 m at 0.5 m. The dense lidar stand-in voxelizes at 0.3 m (stride 2 -> 180 x 180)
# where BEVFusion's sparse encoder uses 0.075 m voxels (stride 8 -> the same 180 x 180 output).
SCENES = {
    "bevfusion": dict(image_size=(256, 704), point_cloud_range=(-54.0, -54.0, -5.0, 54.0, 54.0, 3.0),
                      lidar_voxel_size=(0.3, 0.3, 2.0), camera_bev_resolution=0.3, bev_resolution=0.6,
                      map_bound=(-50.0, 50.0, 0.5), dbound=(1.0, 60.0, 0.5)),
    "reference": {},  # the tests' small scene (quick runs with --size tiny)
}
BEVFUSION_CAMERAS = 6
IDEAL_MS, ACCEPTABLE_MS, CUDA_BEVFUSION_MS = 60.0, 80.0, 1e3 / 25  # seed targets; CUDA-BEVFusion's published 25 FPS
TARGETS_MS = {"ideal (seed)": IDEAL_MS, "acceptable (seed)": ACCEPTABLE_MS, "CUDA-BEVFusion 25 FPS": CUDA_BEVFUSION_MS}
VARIANTS = ("dense", "pruned")
START = time.perf_counter()


def batches(scene: str, cameras: int, count: int) -> list[dict]:
    """`count` one-frame synthetic batches rendered with `cameras` cameras at the scene's image size and ranges."""
    knobs = {**SCENE, **SCENES[scene]}
    ds = SyntheticBEVDataset(count, split="val", point_cloud_range=knobs["point_cloud_range"],
                             map_bound=knobs["map_bound"], image_size=knobs["image_size"], num_cameras=cameras)
    return [collate([ds[i]]) for i in range(count)]


def recipes() -> tuple[PruningRecipe, QuantizationRecipe]:
    """The shipped seed recipes (pruning, then INT8 QAT), through the project's parser."""
    prune, qat = (parse_recipe(yaml.safe_load((CONFIGS / name).read_text())["compression"])
                  for name in ("prune_seed.yaml", "qat_int8.yaml"))
    return prune.pruning, qat.quantization


def prune(model: torch.nn.Module, batch: dict, recipe: PruningRecipe) -> tuple[torch.nn.Module, dict]:
    """A copy pruned in one shot to the recipe's final ratios (scale searched for its target), and what was done."""
    spec = recipe.spec()
    scale = core.scale_for_target(model, batch, spec, params_reduction=recipe.params_reduction,
                                  flops_reduction=recipe.flops_reduction)
    ratios = recipe.cumulative_ratios(recipe.schedule.num_events, scale)
    history = core.plan_pruning(model, batch, spec, ratios)
    pruned = copy.deepcopy(model)
    core.apply_pruning(pruned, batch, history)
    return pruned, {"scale": scale, "ratios": ratios, "steps": len(history)}


def quantize(model: torch.nn.Module, calib: list[dict], recipe: QuantizationRecipe) -> None:
    """INT8 quantizers calibrated on the synthetic batches, as the QuantizationHook does (PTQ, one rank)."""
    quant.quantize_model(model, recipe.spec)
    quant.calibrate(model, recipe.spec, calib, eval_forward)


def export(model: torch.nn.Module, cfg: Config, batch: dict, root: Path, source: dict) -> tuple[dict, list[str]]:
    """The deploy bundle of the in-memory model into `root` (the export CLI after its rebuild): its report and the
    checks it fails (the CLI would publish no bundle; latency and the projection do not depend on them)."""
    options = ExportOptions(config=source["config"], checkpoint=source["checkpoint"], out=root)
    names = [name for name, part in PARTS.items() if unavailable_reason(model, part) is None]
    report = export_bundle(model, cfg, batch, root, options, source, names, log=lambda line: print(f"  {line}"))
    return report, check_failures(report, strict_dla=False)


def session(path: Path, threads: int | None = None) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    """A CPU session (intra-op threads = cores unless given, sequential) and seeded random inputs of its static
    shapes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads or os.cpu_count(), 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    return sess, {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in sess.get_inputs()}


def time_parts(onnx: dict[tuple[str, str], Path], repeats: int,
               threads: int | None = None) -> dict[str, dict[str, list[float]]]:
    """Seconds per run of each (variant, part) FP32 ONNX, the variants alternating part by part in every repeat,
    after one warm-up run each."""
    runs = {}
    for key, path in onnx.items():
        sess, feed = session(path, threads)
        runs[key] = lambda s=sess, f=feed: s.run(None, f)
    samples: dict[str, dict[str, list[float]]] = {variant: {} for variant, _ in onnx}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for (variant, part), fn in sorted(runs.items(), key=lambda item: item[0][1]):
            samples[variant].setdefault(part, []).append(median_seconds(fn, repeats=1, warmup=0)[0])
    return samples


def projection(entry: dict) -> dict:
    """The report's roofline where the part is deployed (INT8 if quantized; DLA parts at the planned DLA/GPU split),
    with the share of its FLOPs placed on the DLA and the share the DLA rules would accept."""
    precision = "int8" if "int8" in entry["roofline"] else "fp16"
    roof, on_dla = entry["roofline"][precision], entry["target"] == "dla"
    plan, nodes = entry["placement"]["plan"], entry["placement"]["nodes"]
    planned = {layer for s in plan["segments"] if s["device"] == "DLA" for layer in s["layers"]} if on_dla else set()
    capable = {n["name"] for n in nodes if n["on_dla"]}
    flops = 1e9 * roof["gflops"] or 1.0
    return {
        "precision": precision,
        "fp16_layers": roof["layer_precisions"].get("fp16", 0) if precision == "int8" else 0,
        "placement": "planned DLA/GPU split" if on_dla else "GPU",
        "projected_ms": roof["projected_ms"]["plan" if on_dla else "gpu"],
        "gflops": roof["gflops"],
        "dla_flop_share": sum(c["flops"] for c in roof["layers"] if c["name"] in planned) / flops,
        "dla_capable_flop_share": sum(c["flops"] for c in roof["layers"] if c["name"] in capable) / flops,
        "dla_capable_layers": len(capable),
        "layers": len(nodes),
        "dla_loadables": plan["dla_loadables"] if on_dla else 0,
    }


def compare(gflops: dict[str, float], ms: dict[str, float]) -> dict:
    """Measured speedup next to the FLOPs ratio it would have if latency followed FLOPs."""
    flops_ratio, speedup = gflops["dense"] / gflops["pruned"], ms["dense"] / ms["pruned"]
    return {"gflops": gflops, "ort_ms": ms, "flops_ratio": flops_ratio, "speedup": speedup,
            "speedup_over_flops_ratio": speedup / flops_ratio}


def summarize(reports: dict[str, dict], samples: dict[str, dict[str, list[float]]]) -> tuple[dict, dict]:
    """Per part and in total: FLOPs, median ORT ms, speedup vs FLOPs ratio and the projected Orin ms."""
    parts = {}
    for name, entry in reports["dense"]["parts"].items():
        gflops = {v: reports[v]["parts"][name]["gflops"] for v in VARIANTS}
        ms = {v: 1e3 * statistics.median(samples[v][name]) for v in VARIANTS}
        orin = {v: projection(reports[v]["parts"][name]) for v in VARIANTS}
        parts[name] = {"target": entry["target"], **compare(gflops, ms), "orin": orin,
                       "ort_samples_s": {v: samples[v][name] for v in VARIANTS}}
    frames = {v: [sum(run) for run in zip(*samples[v].values(), strict=True)] for v in VARIANTS}
    gflops = {v: sum(p["gflops"][v] for p in parts.values()) for v in VARIANTS}
    total = compare(gflops, {v: 1e3 * statistics.median(frames[v]) for v in VARIANTS})
    total["orin_ms"] = {v: sum(p["orin"][v]["projected_ms"] for p in parts.values()) for v in VARIANTS}
    total["ort_frame_samples_s"] = frames
    return parts, total


def all_cameras(parts: dict, total: dict, cameras: int) -> dict[str, float]:
    """The projected frame with camera.backbone's projection (batch = cameras) scaled to BEVFusion's 6 cameras: its
    FLOPs and activation bytes grow with the batch, its weight bytes do not, so this errs high."""
    extra = BEVFUSION_CAMERAS / cameras - 1
    return {v: total["orin_ms"][v] + extra * parts["camera.backbone"]["orin"][v]["projected_ms"] for v in VARIANTS}


def verdict(ms: float) -> str:
    """A projected frame time against the seed's <60 / <80 ms targets and CUDA-BEVFusion's 25 FPS (40 ms)."""
    meets = {True: "meets", False: "misses"}
    ratio = max(ms, CUDA_BEVFUSION_MS) / min(ms, CUDA_BEVFUSION_MS)
    return (f"{ms:.1f} ms ({1e3 / ms:.0f} FPS): {meets[ms < IDEAL_MS]} the <{IDEAL_MS:g} ms ideal and "
            f"{meets[ms < ACCEPTABLE_MS]} the <{ACCEPTABLE_MS:g} ms acceptable target; "
            f"{'faster' if ms < CUDA_BEVFUSION_MS else 'slower'} than CUDA-BEVFusion's 25 FPS "
            f"({CUDA_BEVFUSION_MS:g} ms) by {ratio:.1f}x")


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    return "\n".join(lines + [f"| {' | '.join(map(str, row))} |" for row in rows])


def ort_table(parts: dict, total: dict) -> str:
    """Dense vs pruned onnxruntime ms per part and per frame, with the FLOPs ratio."""
    def row(name: str, r: dict) -> list[Any]:
        g, ms = r["gflops"], r["ort_ms"]
        return [name, f"{g['dense']:.1f}", f"{g['pruned']:.1f}", f"{r['flops_ratio']:.2f}x", f"{ms['dense']:.1f}",
                f"{ms['pruned']:.1f}", f"{r['speedup']:.2f}x", f"{r['speedup_over_flops_ratio']:.2f}"]

    header = ["part", "dense GFLOPs", "pruned GFLOPs", "FLOPs ratio", "dense ms", "pruned ms", "speedup",
              "speedup / FLOPs ratio"]
    rows = [row(name, r) for name, r in parts.items()] + [row("**frame (sum)**", total)]
    return table(header, rows)


def orin_table(parts: dict, total: dict) -> str:
    """Projected Orin ms per part, with the precision and the share of FLOPs the plan puts on the DLA."""
    rows = []
    for name, r in parts.items():
        d, p = r["orin"]["dense"], r["orin"]["pruned"]
        rows.append([name, f"{p['precision'].upper()} ({p['fp16_layers']} FP16-pinned), {p['placement']}",
                     f"{p['dla_capable_layers']}/{p['layers']} ({100 * p['dla_capable_flop_share']:.0f} %)",
                     f"{100 * d['dla_flop_share']:.0f} % / {100 * p['dla_flop_share']:.0f} %",
                     f"{d['projected_ms']:.2f}", f"{p['projected_ms']:.2f}"])
    orin = total["orin_ms"]
    rows.append(["**frame (sum)**", "", "", "", f"{orin['dense']:.1f}", f"{orin['pruned']:.1f}"])
    header = ["part", "precision (layers pinned to FP16, pruned), placement", "DLA-capable layers, pruned (% of FLOPs)",
              "FLOPs on DLA (dense / pruned)", "dense ms", "pruned ms"]
    return table(header, rows)


def resolution(scene: str, size: str, cameras: int) -> dict:
    """The input and grid sizes the model was built and exported at."""
    k = {**SCENE, **SIZES[size], **SCENES[scene]}
    r, m, d = k["point_cloud_range"], k["map_bound"], k["dbound"]
    return {"cameras": cameras, "image": list(k["image_size"]), "range_m": r[3],
            "bev_grid": round((r[3] - r[0]) / k["bev_resolution"]), "bev_resolution_m": k["bev_resolution"],
            "map_grid": round((m[1] - m[0]) / m[2]), "depth_bins": round((d[1] - d[0]) / d[2]),
            "lidar_grid": round((r[3] - r[0]) / k["lidar_voxel_size"][0])}


def partial_rig(result: dict) -> str:
    """Why a BEVFusion-scene run has fewer than BEVFusion's cameras, or nothing."""
    if result["scene"] != "bevfusion" or result["resolution"]["cameras"] == BEVFUSION_CAMERAS:
        return ""
    return f"; BEVFusion has {BEVFUSION_CAMERAS} (a quicker run with fewer cameras was asked for)"


def parity_results(report: dict) -> dict[str, dict[str, dict]]:
    """The export's parity result per part (the BEV pool too) and flavour, as the report holds it."""
    parts = {name: entry["parity"] for name, entry in report["parts"].items()}
    return {**parts, "camera.bev_pool": report["bev_pool"]["parity"]} if report["bev_pool"] else parts


def parity_cell(result: dict) -> str:
    """One (part, flavour) parity result: its worst output's max abs against its bound, and the share above it."""
    cells = []
    for r in result["outputs"].values():
        if "max_abs" in r:
            cells.append((r["max_abs"] / r["bound"],
                          f"{r['max_abs']:.2g} / {r['bound']:.2g}, {100 * r['outliers']:.3g} % above"))
        else:
            cells.append((float("inf") if not r["passed"] else 0.0, r.get("detail") or f"{r['mismatched']} mismatched"))
    verdict = "pass" if result["passed"] else "**FAIL**"
    return f"{verdict}: {max(cells)[1]}"


def parity_table(parity: dict[str, dict[str, dict]]) -> str:
    """Every part and flavour's parity in both variants: worst output's max abs / bound and the share above."""
    rows = [[name, flavour, f"{r['tolerance']['max_rel']:g}, {100 * r['tolerance']['outliers']:g} %",
             *(parity_cell(parity[v][name][flavour]) for v in VARIANTS)]
            for name, flavours in parity["dense"].items() for flavour, r in flavours.items()]
    header = ["part", "flavour", "bound x max(1, max abs ref), share allowed above",
              "dense: max abs / bound, share above", "pruned: max abs / bound, share above"]
    return table(header, rows)


def checks(result: dict) -> str:
    """The export's parity verdict in a few words."""
    failed = {v: len(lines) for v, lines in result["export_check_failures"].items() if lines}
    if not failed:
        return "every parity check passed"
    counts = ", ".join(f"{v} {n}" for v, n in failed.items())
    return f"parity failures, listed in the JSON: {counts}; the CLI would not publish such a bundle"


def method(result: dict) -> str:
    """The method paragraph: machine, resolution, models, recipe, export and timing protocol."""
    m, res, prn = result["machine"], result["resolution"], result["pruning"]
    params, flops, load = result["params"], result["torch_gflops"], result["load_average"]
    ratios = ", ".join(f"{g} {100 * r:.0f} %" for g, r in prn["ratios"].items())
    bev, grid, lidar = res["bev_grid"], res["map_grid"], res["lidar_grid"]
    return (
        f"`{result['size']}` reference model built at {res['cameras']} camera(s) x {res['image'][0]}x{res['image'][1]}"
        f" ({result['scene']} scene{partial_rig(result)}), fused BEV {bev}x{bev} ({res['bev_resolution_m']} m over "
        f"+-{res['range_m']:g} m), map grid {grid}x{grid}, {res['depth_bins']} depth bins; the dense lidar stand-in "
        f"reads a {lidar}x{lidar} voxel grid. Pruned in one shot with the core API at "
        f"`configs/compression/prune_seed.yaml` (group scale {prn['scale']:.2f} for its "
        f"-{100 * result['params_target']:.0f} % params target: {ratios}; round_to 8): params "
        f"{params['dense'] / 1e6:.2f} M -> {params['pruned'] / 1e6:.2f} M, torch-counted FLOPs "
        f"{flops['dense']:.1f} G -> {flops['pruned']:.1f} G. Both models quantized with "
        f"`configs/compression/qat_int8.yaml`'s QuantSpec ({result['quantization']}) and calibrated on "
        f"{result['calibration_frames']} synthetic frames (random weights: latency only), then exported in memory "
        f"with `export_bundle` (the export CLI after its rebuild; {checks(result)}). Latency: the FP32 ONNX "
        f"of every part in onnxruntime {result['onnxruntime']} on CPU ({m['cpu']}, {m['cores']} cores, intra-op "
        f"threads {m['cores']}, sequential, seeded random inputs), dense and pruned alternating part by part in one "
        f"process, one warm-up run each, median of {result['repeats']} repeats (a frame: the sum of the six parts in "
        f"one repeat; the kernels between them are not ONNX parts); 1-min load average {load['start']:.1f} at the "
        f"start, {load['timing_start']:.1f} when timing began and {load['end']:.1f} at the end (other jobs share "
        f"the machine; the alternation spreads their load over both variants). GFLOPs per part come "
        f"from the export's roofline layer counter on the ONNX graph (2 per MAC, one per output element otherwise)."
    )


def comparison(result: dict) -> str:
    """The projected frame against the targets, for the workload that is comparable to them."""
    orin, res, cameras = result["total"]["orin_ms"], result["resolution"], result["resolution"]["cameras"]
    measured = f"At {cameras} camera(s) the ONNX parts, run one after another, project to"
    if result["scene"] == "reference":
        return (f"{measured}: dense {verdict(orin['dense'])}; pruned {verdict(orin['pruned'])}. This is the small "
                f"reference scene ({cameras} x {res['image'][0]}x{res['image'][1]}), not BEVFusion's 6 x 256x704 / "
                "180x180: the projection is not comparable 1:1 to the targets.")
    if cameras == BEVFUSION_CAMERAS:
        return (f"{measured}: dense {verdict(orin['dense'])}; pruned {verdict(orin['pruned'])}. These are BEVFusion's "
                "input sizes and cameras: the frame has the workload the targets are about.")
    six, n = result["total"]["orin_ms_all_cameras"], BEVFUSION_CAMERAS
    return (f"{measured} dense {orin['dense']:.1f} ms, pruned {orin['pruned']:.1f} ms: BEVFusion's image size and "
            f"grids but {cameras} of its {n} cameras, so not yet the targets' workload. Extrapolated to {n} cameras "
            f"(camera.backbone's projection x{n / cameras:g}: its FLOPs and activation bytes grow with the camera "
            f"batch, its weight bytes do not, so this errs high), dense {verdict(six['dense'])}; pruned "
            f"{verdict(six['pruned'])}.")


def markdown(result: dict, plots: dict[str, Path]) -> str:
    """The README section: method, the two tables, the verdict against the targets and the plots."""
    parts, total = result["parts"], result["total"]
    links = "\n".join(f"![{name}](results/{path.name})" for name, path in plots.items())
    return f"""## Deployed compute: onnxruntime latency dense vs pruned, projected Orin latency (`deploy_latency.py`)

{method(result)}

Parity of every exported part and flavour (onnxruntime vs PyTorch on seeded random inputs, as in the export
report; the worst output per row):

{parity_table(result['parity'])}

FP32 onnxruntime on this CPU (measured):

{ort_table(parts, total)}

Per frame the pruned model runs {total['speedup']:.2f}x faster where its FLOPs fall {total['flops_ratio']:.2f}x.

Projected Orin latency (**roofline projection from the export report, not a measurement**: per layer max(FLOPs /
peak, bytes / DRAM bandwidth) at the layer's own precision (INT8 for every quantized part, its FP16-pinned layers at
FP16), pointwise layers TensorRT fuses moving only their other inputs, assumed fixed costs per kernel launch, DLA<->GPU
transition and DLA loadable, ideal utilisation; DLA parts at the partition plan's DLA/GPU split, GPU parts on the GPU):

{orin_table(parts, total)}

{comparison(result)} The frame sum leaves out the GPU kernels between the parts (voxelization, depth image, BEV pool,
box decoding), counts the dense lidar stand-in where BEVFusion runs spconv, and assumes no DLA/GPU concurrency and
ideal utilisation, whereas CUDA-BEVFusion's 25 FPS is a measured frame rate.

{links}

(`results/deploy_latency.json`)
"""


def plot_placement(parts: dict) -> Path:
    """Stacked bars: the share of each part's FLOPs placed on the DLA, DLA-capable but left on the GPU, GPU only."""
    fig, ax, path = figure("deploy_latency_placement", figsize=(11, 4.5))
    x = np.arange(len(parts))
    for offset, variant, hatch in ((-0.2, "dense", ""), (0.2, "pruned", "//")):
        orin = [r["orin"][variant] for r in parts.values()]
        dla = np.array([100 * o["dla_flop_share"] for o in orin])
        capable = np.array([100 * o["dla_capable_flop_share"] for o in orin]) - dla
        for bottom, share, color, label in ((0, dla, "tab:green", "on the DLA"),
                                            (dla, capable, "yellowgreen", "DLA-capable, on the GPU"),
                                            (dla + capable, 100 - dla - capable, "tab:blue", "GPU only")):
            ax.bar(x + offset, share, 0.38, bottom=bottom, color=color, hatch=hatch, label=f"{label} ({variant})")
    labels = [f"{name}\n{r['orin']['pruned']['precision'].upper()}, {r['target'].upper()} part" for name, r in
              parts.items()]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("% of the part's FLOPs")
    ax.set_title("DLA / GPU placement per part (export partition plan; left bar dense, right bar pruned)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_latency(parts: dict, total: dict) -> Path:
    """Left: measured onnxruntime ms per part; right: projected Orin ms per frame against the 40/60/80 ms lines."""
    fig, (ort_ax, orin_ax), path = figure("deploy_latency_latency", ncols=2, figsize=(14, 5))
    x = np.arange(len(parts))
    for offset, variant in ((-0.2, "dense"), (0.2, "pruned")):
        ort_ax.bar(x + offset, [r["ort_ms"][variant] for r in parts.values()], 0.38, label=variant)
    ort_ax.set_xticks(x, list(parts), rotation=20, ha="right")
    ort_ax.set_ylabel("ms per run (median)")
    ort_ax.set_title("Measured: FP32 onnxruntime on this CPU")
    ort_ax.legend()
    bottom = np.zeros(len(VARIANTS))
    for name, r in parts.items():
        ms = np.array([r["orin"][v]["projected_ms"] for v in VARIANTS])
        orin_ax.bar(VARIANTS, ms, 0.5, bottom=bottom, label=f"{name} ({r['orin']['pruned']['precision'].upper()})")
        bottom += ms
    if "orin_ms_all_cameras" in total:
        extra = np.array([total["orin_ms_all_cameras"][v] for v in VARIANTS]) - bottom
        orin_ax.bar(VARIANTS, extra, 0.5, bottom=bottom, color="white", edgecolor="tab:blue", hatch="..",
                    label=f"camera.backbone, cameras 2-{BEVFUSION_CAMERAS} (extrapolated)")
    for (label, ms), style in zip(TARGETS_MS.items(), (":", "--", "-."), strict=True):
        orin_ax.axhline(ms, color="black", linestyle=style, linewidth=1, label=f"{label}: {ms:g} ms")
    orin_ax.set_ylabel("ms per frame")
    orin_ax.set_title("Projected (roofline, not measured): Orin per frame")
    orin_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def lap(phases: dict[str, float], name: str) -> None:
    """Record and print the seconds since the previous lap (the first one: since START)."""
    phases[name] = time.perf_counter() - sum(phases.values()) - START
    print(f"{name}: {phases[name]:.0f} s", flush=True)


def main() -> None:
    """Build, prune, quantize and export both models, time their ONNX parts alternately, then report and plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="full")
    parser.add_argument("--scene", default="bevfusion", choices=SCENES, help="input sizes: BEVFusion's or the tests'")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cameras", type=int, default=BEVFUSION_CAMERAS, help="cameras per frame; see above")
    parser.add_argument("--calibration-frames", type=int, default=2)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    torch.manual_seed(0)
    prune_recipe, quant_recipe = recipes()
    config = reference_config(args.size, **SCENES[args.scene])
    frames = batches(args.scene, args.cameras, args.calibration_frames)
    phases: dict[str, float] = {}
    models = {"dense": build_model(config).eval()}
    models["pruned"], pruning = prune(models["dense"], frames[0], prune_recipe)
    counts = {v: core.count_params_flops(m, frames[0]) for v, m in models.items()}
    lap(phases, "data_build_prune")
    for model in models.values():
        quantize(model, frames, quant_recipe)
    lap(phases, "quantize_and_calibrate")
    cfg = Config(dict(model=config, object_classes=list(SCENE["object_classes"]),
                      map_classes=list(SCENE["map_classes"])))
    with tempfile.TemporaryDirectory() as tmp:
        roots = {v: Path(tmp) / v for v in VARIANTS}
        sources = {v: {"config": f"reference_config({args.size!r}), {args.scene} scene", "checkpoint": f"(in memory, "
                       f"{v})", "pruning_events": int(v == "pruned")} for v in VARIANTS}
        exported = {v: export(models[v], cfg, frames[0], roots[v], sources[v]) for v in VARIANTS}
        reports = {v: report for v, (report, _) in exported.items()}
        lap(phases, "export")
        onnx = {(v, p): roots[v] / e["files"]["onnx"] for v in VARIANTS for p, e in reports[v]["parts"].items()}
        timing_load = os.getloadavg()[0]
        samples = time_parts(onnx, args.repeats)
        lap(phases, "onnxruntime_timing")
    parts, total = summarize(reports, samples)
    if args.scene == "bevfusion" and args.cameras != BEVFUSION_CAMERAS:
        total["orin_ms_all_cameras"] = all_cameras(parts, total, args.cameras)
    result = {
        "size": args.size, "scene": args.scene, "resolution": resolution(args.scene, args.size, args.cameras),
        "repeats": args.repeats, "calibration_frames": args.calibration_frames, "onnxruntime": ort.__version__,
        "load_average": {"start": load, "timing_start": timing_load, "end": os.getloadavg()[0]},
        "params_target": prune_recipe.params_reduction, "pruning": pruning,
        "params": {v: c[0] for v, c in counts.items()}, "torch_gflops": {v: c[1] / 1e9 for v, c in counts.items()},
        "quantization": reports["pruned"]["source"]["quantization"], "targets_ms": TARGETS_MS,
        "export_check_failures": {v: failed for v, (_, failed) in exported.items()},
        "parity": {v: parity_results(report) for v, report in reports.items()},
        "parts": parts, "total": total, "phase_seconds": phases,
    }
    plots = {"latency per part and projected frame time": plot_latency(parts, total),
             "DLA/GPU placement per part": plot_placement(parts)}
    result["wall_seconds"] = time.perf_counter() - START
    print(save("deploy_latency", result), write_section("deploy_latency", markdown({"machine": machine(), **result},
                                                                                     plots)))
    print(f"ORT frame {total['ort_ms']}, speedup {total['speedup']:.2f}x vs FLOPs {total['flops_ratio']:.2f}x; "
          f"Orin projection {total['orin_ms']} ms; {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
