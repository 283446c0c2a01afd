"""report.json (everything, machine-readable) and report.md (the same, for people) of a deploy bundle: parts, shapes,
params / FLOPs, parity, FP16 activation range, per-node DLA / GPU placement with reasons, and the roofline latency
projection."""

from __future__ import annotations

import json
from pathlib import Path

from .fp16_range import AT_RISK_ABOVE, FP16_MAX
from .roofline import ASSUMPTIONS, DRAM_BYTES_PER_S, PEAKS


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def _shape(spec: dict) -> str:
    return f"{spec['name']} [{', '.join(map(str, spec['shape']))}]" + (
        "" if spec["dtype"] == "float32" else f" {spec['dtype']}"
    )


def _worst(parity: dict) -> str:
    """Largest max-error / bound ratio over the outputs of one flavour, and the largest share of elements above it."""
    ratios, shares = [], []
    for result in parity["outputs"].values():
        if "max_abs" in result:
            ratios.append(result["max_abs"] / result["bound"])
            shares.append(result["outliers"])
        elif not result["passed"]:
            ratios.append(float("inf"))
    above = f" ({max(shares):.1e} of elements above)" if max(shares, default=0.0) else ""
    return f"{'ok' if parity['passed'] else 'FAIL'} {max(ratios, default=0.0):.2f}{above}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _latency(entry: dict) -> str:
    """Projected ms where the part is meant to run: the planned DLA/GPU split for DLA parts, else the GPU."""
    where = "plan" if entry["target"] == "dla" else "gpu"
    return " / ".join(
        f"{p}: {_ms(r['projected_ms'].get(where, r['projected_ms']['gpu']))}" for p, r in entry["roofline"].items()
    )


def _qdq(entry: dict) -> str:
    counts = entry.get("qdq_nodes")
    return f"{counts['QuantizeLinear']} / {counts['DequantizeLinear']}" if counts else "-"


def _summary(report: dict) -> list[str]:
    rows = []
    for name, e in report["parts"].items():
        plan, nodes = e["placement"]["plan"], e["placement"]["nodes"]
        rows.append(
            [
                name,
                e["target"].upper(),
                "<br>".join(map(_shape, e["inputs"])),
                "<br>".join(map(_shape, e["outputs"])),
                f"{e['params'] / 1e6:.3f}",
                _qdq(e),
                f"{e['gflops']:.3f}",
                " ".join(f"{f}: {_worst(p)}" for f, p in e["parity"].items()),
                f"{sum(n['on_dla'] for n in nodes)}/{len(nodes)}",
                plan["dla_loadables"],
                plan["transitions"],
                _latency(e),
            ]
        )
    header = [
        "part",
        "meant for",
        "inputs",
        "outputs",
        "params (M)",
        "Q / DQ nodes",
        "GFLOPs",
        "parity (error / bound)",
        "DLA layers",
        "DLA loadables",
        "DLA<->GPU transitions",
        "projected ms (DLA parts: planned split)",
    ]
    return _table(header, rows)


def _parity(report: dict) -> list[str]:
    lines = ["Tolerances (error relative to max(1, max |PyTorch output|); integer outputs must match exactly):", ""]
    lines += _table(
        ["flavour", "max", "elements allowed above max", "mean", "why"],
        [[f, t["max_rel"], t["outliers"], t["mean_rel"], t["why"]]
         for f, t in report["settings"]["tolerances"].items()],
    )
    rows = []
    kernel_check = {"camera.bev_pool (kernel check)": report["bev_pool"]} if report["bev_pool"] else {}
    for name, e in {**report["parts"], **kernel_check}.items():
        for flavour, p in e["parity"].items():
            for output, r in p["outputs"].items():
                stats = [f"{r[k]:.3g}" if k in r else "-" for k in ("max_abs", "outliers", "mean_abs", "scale")]
                rows.append([name, flavour, output, *stats, r.get("mismatched", "-"), "ok" if r["passed"] else "FAIL"])
    seed, threads = report["settings"]["seed"], report["settings"]["ort_threads"]
    lines += [
        "",
        f"onnxruntime CPU, {threads} threads, fresh inputs: each example input's own values in a random order "
        f"(seed {seed}). head.object is compared on onnxruntime's top-k proposals, so near-tied picks do not count "
        "as errors: the reference head re-runs on onnxruntime's `query_labels` / `query_cells`, BEVFusion's "
        "TransFusionHead on onnxruntime's `dense_heatmap` and tied `query_proposals`; `[free]` rows compare "
        "PyTorch's own run (the top-k values, the heatmap the top-k reads).",
        "",
        *(f"- noqdq of {name} keeps the fake quantization of Q/DQ-graph constants, as TensorRT folds them: "
          f"{', '.join(f'`{q}`' for q in e['noqdq_constant_quantizers'])}"
          for name, e in report["parts"].items() if e.get("noqdq_constant_quantizers")),
        "",
    ]
    return lines + _table(
        ["part", "flavour", "output", "max abs", "share above max", "mean abs", "max |ref|", "mismatched", "result"],
        rows,
    )


def _finding(f: dict) -> str:
    value = "inf/nan" if f["nonfinite"] else f"{f['max_abs']:.3g}"
    marks = (" (INT8 scale)" if f["int8"] else "") + (" (DLA)" if f["on_dla"] else "")
    return f"`{f['layer'] or 'input ' + f['tensor']}` {value}{marks}"


def _offenders(findings: list[dict], shown: int = 5) -> str:
    """The first `shown` offending layers (inputs by tensor name) with their max |x|, in graph order."""
    more = f" and {len(findings) - shown} more" if len(findings) > shown else ""
    return ", ".join(map(_finding, findings[:shown])) + more if findings else "-"


def _fp16_fix(name: str, r: dict) -> str:
    dla = any(f["on_dla"] for f in r["overflow"])
    return (
        f"- **{name}** overflows FP16: rescale / normalise its input, quantize the layer to INT8, or build `gpu_fp16` "
        f"with `{' '.join(r['gpu_fp32_flags'])}` (not added to `scripts/build_engines.sh`)"
        + ("; the DLA has no FP32, so its DLA layers can only be FP32 on the GPU" if dla else "")
    )


def _fp16_range(report: dict) -> list[str]:
    ranges = {name: e["fp16_range"] for name, e in report["parts"].items()}
    lines = [
        f"Every non-INT8 layer runs in FP16 on the Orin, where |x| > {FP16_MAX:g} becomes inf; FP32 parity cannot "
        "show that. Max |x| of every float tensor of each FP32 ONNX, measured in onnxruntime on the captured example "
        f"and the parity inputs. At risk: above {AT_RISK_ABOVE:g} (under {FP16_MAX / AT_RISK_ABOVE:g}x headroom for "
        "inputs beyond these few samples). `(INT8 scale)`: saturates at its amax instead wherever TensorRT runs it in "
        "INT8 (the `gpu_fp16` engine still overflows); `(DLA)`: planned on the DLA, which has no FP32.",
        "",
    ]
    rows = [
        [
            name,
            f"{r['max_abs']:.4g} (`{r['max_abs_layer'] or r['max_abs_tensor']}`)",
            f"{FP16_MAX / r['max_abs']:.1f}x" if r["max_abs"] else "-",
            _offenders(r["overflow"]),
            _offenders(r["at_risk"]),
        ]
        for name, r in ranges.items()
    ]
    lines += _table(["part", "largest max abs (layer)", f"headroom to {FP16_MAX:g}", "overflow", "at risk"], rows)
    fixes = [_fp16_fix(name, r) for name, r in ranges.items() if r["overflow"]]
    return [*lines, *([""] if fixes else []), *fixes]


def _kernels(report: dict) -> list[str]:
    lines = []
    for k in report["kernels"]:
        lines += [f"### {k['name']} ({k['runs_as']})", k["notes"], ""]
        lines += _table(
            ["direction", "tensor", "dtype", "shape"],
            [[d, t["name"], t["dtype"], t["shape"]] for d in ("inputs", "outputs") for t in k[d]],
        )
        lines.append("")
    return lines


def _placement(name: str, entry: dict) -> list[str]:
    placement, plan = entry["placement"], entry["placement"]["plan"]
    lines = [
        f"### {name}",
        f"Checked graph: `{placement['graph']}` at {placement['precision']}. "
        f"Fits one DLA loadable entirely: {'yes' if plan['fits_dla_entirely'] else 'no'}.",
        "",
    ]
    lines += _table(
        ["op", "DLA", "GPU", "GPU reasons"],
        [
            [op, s["dla"], s["gpu"], ", ".join(f"{r} x{c}" for r, c in s["reasons"].items())]
            for op, s in plan["op_summary"].items()
        ],
    )
    if plan["suggestions"]:
        lines += [
            "",
            "Suggestions:",
            *(f"- {s['reason']} ({s['count']} layers): {s['suggestion']}" for s in plan["suggestions"]),
        ]
    segments = [
        [i, s["device"], len(s["layers"]), ", ".join(s["inputs"][:3]), ", ".join(s["outputs"][:3])]
        for i, s in enumerate(plan["segments"])
    ]
    lines += ["", f"<details><summary>{len(segments)} segments in execution order</summary>", ""]
    lines += [*_table(["#", "device", "layers", "inputs (first 3)", "outputs (first 3)"], segments), "", "</details>"]
    nodes = [
        [n["name"], n["op_type"], "DLA" if n["on_dla"] else "GPU", n["reason"], n["detail"], n["source"]]
        for n in placement["nodes"]
    ]
    lines += ["", f"<details><summary>every node ({len(nodes)})</summary>", ""]
    lines += _table(["node", "op", "device", "reason", "detail", "NVIDIA source of the rule"], nodes)
    return [*lines, "", "</details>", ""]


def _roofline(report: dict) -> list[str]:
    peaks = [[unit, precision, f"{ops / 1e12:g}"] for unit, by in PEAKS.items() for precision, ops in by.items()]
    lines = [
        "**Projection, not a measurement**: per layer max(FLOPs / peak, bytes / DRAM bandwidth), summed; ideal "
        "utilisation, a lower bound for the engines `scripts/benchmark.sh` times.",
        "",
    ]
    lines += _table(["unit", "precision", "peak (T ops/s)"], peaks)
    lines += ["", f"DRAM bandwidth {DRAM_BYTES_PER_S / 1e9:g} GB/s.", *(f"- {a}" for a in ASSUMPTIONS), ""]
    rows = [
        [
            name,
            precision,
            f"{r['gflops']:.3f}",
            f"{r['weight_mb']:.2f}",
            f"{r['activation_mb']:.2f}",
            _ms(r["projected_ms"]["gpu"]),
            _ms(r["projected_ms"]["dla_core"]),
            _ms(r["projected_ms"].get("plan")),
        ]
        for name, e in report["parts"].items()
        for precision, r in e["roofline"].items()
    ]
    return lines + _table(
        [
            "part",
            "precision",
            "GFLOPs",
            "weights MB",
            "activations MB",
            "GPU ms",
            "one DLA core ms",
            "planned placement ms",
        ],
        rows,
    )


def markdown(report: dict) -> str:
    """report.md: the summary first, then parity, kernels, placement per node, roofline, build and notes."""
    source, settings, build = report["source"], report["settings"], report["engine_build"]
    lines = [
        "# BEVFusion deploy report",
        "",
        f"- config `{source['config']}`, checkpoint `{source['checkpoint']}`",
        f"- pruning events replayed: {source['pruning_events']}; parameters: {source['params'] / 1e6:.3f} M",
        f"- quantization: {source['quantization']}",
        f"- BatchNorm: {source['bn']}",
        f"- TensorRT target {settings['trt_version']} (cache tag `{settings['calib_tag']}`), ONNX opset "
        f"{settings['opset']}, batch 1, static shapes",
        f"- export time {report['timing_s']['total']:.1f} s (rebuild {report['timing_s']['rebuild']:.1f} s)",
        "",
        "## Parts",
        "",
        *_summary(report),
        "",
        *(f"- not exported: {name} ({why})" for name, why in report["skipped_parts"].items()),
        "",
        "## Parity",
        "",
        *_parity(report),
        "",
        "## FP16 range",
        "",
        *_fp16_range(report),
        "",
        "## GPU kernels and pre/post-processing between the parts",
        "",
        *_kernels(report),
        "## DLA / GPU placement",
        "",
        *(line for n, e in report["parts"].items() for line in _placement(n, e)),
        "## Projected Orin latency",
        "",
        *_roofline(report),
        "",
        "## Engine build",
        "",
        "Exact trtexec commands per part and target: `scripts/build_engines.sh` (also in report.json).",
        f"In-process TensorRT build: {build['status']}.",
        "",
        "## Notes",
        "",
        *(f"- {note}" for note in report["notes"]),
    ]
    return "\n".join(lines) + "\n"


def write_report(root: Path, report: dict) -> None:
    """report.json and report.md at the bundle root."""
    (root / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (root / "report.md").write_text(markdown(report))
