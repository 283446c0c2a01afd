"""Accuracy of the deployed model (seed 5.4): the bundle's runtime over the validation set, scored by the dataset's own
evaluator (the one training uses), beside the PyTorch model of the same checkpoint in the same quantization mode, with
per-frame agreement (boxes matched, mask IoU). Written into the bundle as eval.json / eval.md, linked from report.md.

A flavour fails when a deployed headline metric falls below PyTorch's by more than its tolerance (TOLERANCES).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..deploy.agreement import agreement
from ..deploy.runtime import Frame, Runtime
from ..deploy.spec import BundleSpec
from ..runner.builder import build_dataset
from ..runner.rebuild import load_compressed_model
from ..runner.train import prepare_config
from .bundle import config_yaml
from .parts import flavour_mode, is_quantized

HEADLINE = ("det/mAP", "det/NDS", "seg/mIoU")
REPORT_LINK = "\n## Accuracy of the deployed model\n\nRuntime over the validation set vs PyTorch: [eval.md](eval.md).\n"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Tolerance:
    """How far (absolute, on a [0, 1] metric) a deployed metric may fall below PyTorch's, and why that much."""

    max_drop: float
    why: str


TOLERANCES = {
    "fp32": Tolerance(0.005, "the FP32 parts equal PyTorch to ~1e-6; only a near-tied proposal top-k or a box on a "
                             "matching-distance edge can move a metric"),
    "qdq": Tolerance(0.02, "onnxruntime's INT8 Q/DQ arithmetic vs PyTorch's fake quantization: rounding flips move "
                           "outputs by up to ~0.1 (parity tolerance 0.15) and can swap near-tied proposals"),
}


class DeployedEvalError(ValueError):
    """Bad input (bundle from another config, missing checkpoint, unknown flavour): one line, nothing written."""


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first dotted key where two config trees differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (path, a, b)


def check_same_model(cfg: Any, config: str, spec: BundleSpec) -> None:
    """The config's resolved `model` section must be the bundle's (models/config.yaml), else the parts do not fit."""
    diff = _first_difference(yaml.safe_load(config_yaml(cfg))["model"], spec.config["model"], "model")
    if diff:
        key, ours, theirs = diff
        raise DeployedEvalError(f"bundle {spec.root} was exported from another config: {key} is {ours!r} in {config} "
                                f"but {theirs!r} in {spec.root / 'models/config.yaml'}; pass the config the bundle was "
                                "exported from")


def pytorch_results(model: nn.Module, dataset: Dataset, batch_size: int) -> list[dict]:
    """model(return_loss=False) over the split in order (one result dict per sample)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate)
    results: list[dict] = []
    with torch.no_grad():
        for batch in loader:
            results += model(return_loss=False, **batch)
    return results


def deployed_results(runtime: Runtime, dataset: Dataset) -> list[dict]:
    """The runtime on every sample's frame, in order."""
    return [runtime.run(Frame.from_sample(dataset[i], name=f"data.val[{i}]")).result() for i in range(len(dataset))]


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    return {key: metrics[key] for key in HEADLINE if key in metrics}


def evaluate_flavour(model: nn.Module, spec: BundleSpec, dataset: Dataset, flavour: str, backend: str,
                     threads: int | None, batch_size: int) -> dict:
    """PyTorch (quantizers as the flavour's graph computes) and deployed metrics, their gap and agreement."""
    start = time.perf_counter()
    with flavour_mode(model, flavour):
        reference = pytorch_results(model, dataset, batch_size)
    runtime = Runtime(spec, flavour, backend, threads=threads)
    deployed = deployed_results(runtime, dataset)
    ours, theirs = _headline(dataset.evaluate(reference)), _headline(dataset.evaluate(deployed))
    tol = TOLERANCES[flavour]
    drops = {key: ours[key] - theirs[key] for key in ours}
    return {
        "pytorch": ours,
        "deployed": theirs,
        "drop": drops,
        "tolerance": {"max_drop": tol.max_drop, "why": tol.why},
        "passed": all(drop <= tol.max_drop for drop in drops.values()),
        "agreement": agreement(reference, deployed),
        "parts": runtime.describe(),
        "seconds": time.perf_counter() - start,
    }


def evaluate_bundle(config: str, bundle: str | Path, checkpoint: str | None = None, overrides: list[str] = (),
                    flavours: list[str] | None = None, backend: str = "onnxruntime", threads: int | None = None,
                    log: Log = print) -> dict:
    """Every flavour the bundle has (FP32; Q/DQ INT8 for a quantized checkpoint) on the config's validation set."""
    spec = BundleSpec.load(bundle)
    cfg, sources = prepare_config(config, list(overrides))
    check_same_model(cfg, config, spec)
    checkpoint = checkpoint or spec.report["source"]["checkpoint"]
    if not Path(checkpoint).is_file():
        raise DeployedEvalError(f"checkpoint {checkpoint} (report.json source.checkpoint) does not exist: pass "
                                "--checkpoint with the checkpoint the bundle was exported from")
    model, _, _ = load_compressed_model(config, checkpoint, list(overrides))
    available = ["fp32", "qdq"] if is_quantized(model) else ["fp32"]
    unknown = [f for f in flavours or () if f not in available]
    if unknown:
        raise DeployedEvalError(f"flavour(s) {', '.join(unknown)} not evaluable for this checkpoint; choose from "
                                f"{', '.join(available)}")
    dataset = build_dataset(cfg.data.val, "data.val", sources)
    result = {"config": config, "checkpoint": checkpoint, "bundle": str(spec.root), "backend": backend,
              "frames": len(dataset), "flavours": {}}
    for flavour in flavours or available:
        entry = evaluate_flavour(model, spec, dataset, flavour, backend, threads, cfg.data.get("samples_per_gpu", 4))
        result["flavours"][flavour] = entry
        log(summary_line(flavour, entry))
    result["passed"] = all(entry["passed"] for entry in result["flavours"].values())
    return result


def summary_line(flavour: str, entry: dict) -> str:
    """One line per flavour: deployed vs PyTorch per metric, agreement, verdict."""
    metrics = ", ".join(f"{k.split('/')[1]} {entry['deployed'][k]:.4f} vs {entry['pytorch'][k]:.4f}"
                        for k in entry["pytorch"])
    a = entry["agreement"]
    iou = f", mask IoU {a['mask_iou_mean']:.4f}" if "mask_iou_mean" in a else ""
    verdict = "ok" if entry["passed"] else f"FAILED (drop > {entry['tolerance']['max_drop']})"
    return (f"{flavour}: deployed vs PyTorch {metrics}; boxes matched {100 * a['box_match_rate']:.1f} % "
            f"(confident {100 * a['confident_box_match_rate']:.1f} %){iou} [{entry['seconds']:.0f} s] {verdict}")


def markdown(result: dict) -> str:
    """eval.md: the metrics table, agreement table and the tolerances used."""
    lines = [
        "# Accuracy of the deployed model",
        "",
        f"`tools/eval_deployed.py` on {result['frames']} validation frames of `{result['config']}`: the bundle's "
        f"runtime (backend {result['backend']}; parts, kernels, decoding) against the PyTorch model of "
        f"`{result['checkpoint']}` with its quantizers as each flavour's graph computes them (off for FP32, on for "
        "Q/DQ). Same evaluator as training (`dataset.evaluate`). *NDS over the synthetic data's TP metrics.",
        "",
        "| flavour | metric | PyTorch | deployed | drop | tolerance | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for flavour, e in result["flavours"].items():
        for key in e["pytorch"]:
            ok = e["drop"][key] <= e["tolerance"]["max_drop"]
            lines.append(f"| {flavour} | {key} | {e['pytorch'][key]:.4f} | {e['deployed'][key]:.4f} | "
                         f"{e['drop'][key]:+.4f} | {e['tolerance']['max_drop']} | {'ok' if ok else 'FAIL'} |")
    lines += ["", "Per-frame agreement (PyTorch boxes matched one to one to deployed boxes of the same class within "
              f"{next(iter(result['flavours'].values()))['agreement']['match_distance_m']} m; masks binarised at 0.5):",
              "", "| flavour | boxes | matched | confident boxes | matched | max score diff | mean centre diff m | "
              "mask IoU mean | worst frame |", "|---|---|---|---|---|---|---|---|---|"]
    for flavour, e in result["flavours"].items():
        a = e["agreement"]
        iou = (f"{a['mask_iou_mean']:.4f} | {a['mask_iou_worst_frame']:.4f}" if "mask_iou_mean" in a else "- | -")
        lines.append(f"| {flavour} | {a['boxes']} | {100 * a['box_match_rate']:.1f} % | {a['confident_boxes']} | "
                     f"{100 * a['confident_box_match_rate']:.1f} % | {a['matched_score_diff_max']:.2e} | "
                     f"{a['matched_centre_diff_mean_m']:.2e} | {iou} |")
    lines += ["", "Tolerances (deployed may fall below PyTorch by at most):", ""]
    lines += [f"- {f}: {e['tolerance']['max_drop']}: {e['tolerance']['why']}" for f, e in result["flavours"].items()]
    lines += ["", "Parts per flavour:", ""]
    for flavour, e in result["flavours"].items():
        lines += [f"- {flavour}: " + "; ".join(f"{p}: {what}" for p, what in e["parts"].items())]
    return "\n".join(lines) + "\n"


def write(result: dict, bundle: str | Path) -> None:
    """eval.json and eval.md into the bundle, and a link from report.md (once)."""
    root = Path(bundle)
    (root / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (root / "eval.md").write_text(markdown(result))
    report = root / "report.md"
    if "(eval.md)" not in report.read_text():
        report.write_text(report.read_text() + REPORT_LINK)
