"""What tools/export_engine.py does: config + checkpoint -> the compressed model -> ONNX parts in three flavours ->
parity, DLA placement, roofline and trtexec scripts -> a deploy bundle with report.md / report.json.

Every user error (output directory, part name, TensorRT version, config, checkpoint, compression state) is raised as
ExportError before a file is written; a part failing parity (or --strict-dla) raises ExportCheckFailed and leaves no
bundle, since the bundle is assembled next to --out and renamed into place only at the end.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..compression import CheckpointError, read_checkpoint
from ..compression.quantization import qdq_node_counts
from ..compression.quantization.folding import fold_batchnorms
from ..compression.quantization.meta import get_meta
from ..compression.state import CompressionStateError, pruning_events
from ..runner.config import ConfigError
from ..runner.rebuild import MissingCompressionState, load_compressed_model
from . import fp16_range, parity
from .bundle import config_yaml, out_problem, part_files, readme, staged, write_metadata
from .calib_cache import calib_tag, fp16_layers, propagate_scales, scales_from_qdq, strip_qdq, write_calib_cache
from .dla_rules import DEFAULT_TRT_VERSION, check_model
from .partition import Plan, partition
from .parts import (
    BEV_POOL,
    OPSET,
    PARTS,
    Activations,
    PartDef,
    capture,
    constant_quantizers,
    export_onnx,
    first_sample,
    flavour_mode,
    is_quantized,
    kernel_contracts,
    param_count,
    part_for,
    random_inputs,
    sparse_lidar_encoder,
    unavailable_reason,
)
from .report import write_report
from .roofline import roofline
from .tensorrt_build import build_engine, tensorrt_available
from .trtexec import commands, io_formats_from_onnx, write_build_scripts

FORMAT = "bevfusion_ext.export/1"
GPU_TARGETS = {"gpu_fp16": ("onnx", "fp16"), "gpu_int8": ("qdq", "qdq")}  # target -> (artefact, build flavour)
Log = Callable[[str], None]
# A part runs the model's own modules on the model's own tensors, so it must reproduce the model (up to float noise).
FIDELITY = parity.Tolerance(1e-5, 1e-6, "the part re-runs the model's own modules on the model's own tensors")


class ExportError(ValueError):
    """Bad input (output directory, part, TensorRT version, config, checkpoint): reported before anything is written."""


class ExportCheckFailed(RuntimeError):
    """A part failed parity, or (--strict-dla) does not fit the DLA it is meant for: no bundle is published."""


@dataclass
class ExportOptions:
    """The CLI's arguments."""

    config: str
    checkpoint: str
    out: Path
    parts: list[str] | None = None  # None: every part the model has
    strict_dla: bool = False
    force: bool = False
    trt_version: str = DEFAULT_TRT_VERSION
    build: bool = False
    allow_dense: bool = False
    overrides: list[str] = field(default_factory=list)
    seed: int = 0


def _check_parts(requested: list[str] | None) -> None:
    unknown = [name for name in requested or () if name not in PARTS]
    if unknown:
        raise ExportError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")


def _check_trt_version(version: str) -> str:
    try:
        return calib_tag(version)
    except ValueError:
        raise ExportError(f"--trt-version {version!r} is not a TensorRT version like 10.3 or 8.6.1") from None


def _load(options: ExportOptions) -> tuple[nn.Module, object, dict]:
    """The compressed model in eval mode, its config and an example batch; input problems become ExportError."""
    try:
        return load_compressed_model(
            options.config, options.checkpoint, options.overrides, require_compression=not options.allow_dense
        )
    except MissingCompressionState as err:
        raise ExportError(f"{err}, or pass --allow-dense to export the uncompressed model as a baseline") from None
    except (ConfigError, CheckpointError, CompressionStateError) as err:
        raise ExportError(str(err)) from None


def _select(model: nn.Module, requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Parts to export and, for the default selection, those this model lacks (an explicit request must exist)."""
    reasons = {name: unavailable_reason(model, part_for(model, name)) for name in requested or PARTS}
    missing = {name: why for name, why in reasons.items() if why}
    if requested and missing:
        raise ExportError("; ".join(f"part {name} cannot be exported: {why}" for name, why in missing.items()))
    return [name for name in reasons if name not in missing], missing


def _specs(tensors: dict[str, torch.Tensor]) -> list[dict]:
    return [
        {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in tensors.items()
    ]


def _outputs(module: nn.Module, examples: dict[str, torch.Tensor], part: PartDef) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = module(*examples.values())
    return dict(zip(part.outputs, out if isinstance(out, tuple) else (out,), strict=True))


def _fidelity(model: nn.Module, part: PartDef, acts: Activations, outputs: dict[str, torch.Tensor]) -> float:
    """Largest difference between the part and the whole model on the example; nonzero means the split is wrong."""
    worst = 0.0
    for name, ref in zip(part.outputs, part.reference(model, acts), strict=False):
        result = parity.compare(ref, outputs[name].numpy(), FIDELITY)
        if not result["passed"]:
            raise RuntimeError(
                f"part {part.name} does not reproduce the model's own {name} ({result}); "
                "its definition in bevfusion_ext/export/parts.py is out of date with the model code"
            )
        worst = max(worst, result.get("max_abs", 0.0))
    return worst


def _int8(
    model: nn.Module,
    part: PartDef,
    module: nn.Module,
    examples: dict,
    paths: dict[str, Path],
    tag: str,
    seed: int,
    entry: dict,
) -> tuple[onnx.ModelProto, dict[str, float], list[str]]:
    """Q/DQ ONNX (GPU INT8) and, for the DLA, the Q/DQ-free ONNX + calibration cache + FP16 list; parity into entry."""
    qdq = export_onnx(module, examples, part.outputs, paths["qdq"], qdq=True)
    entry["qdq_nodes"] = qdq_node_counts(str(paths["qdq"]))
    entry["noqdq_constant_quantizers"] = constants = constant_quantizers(model, module, examples, qdq)
    stripped = strip_qdq(qdq)
    onnx.save(stripped, str(paths["noqdq"]))
    scales = propagate_scales(stripped, scales_from_qdq(qdq))
    write_calib_cache(scales, paths["cache"], tag)
    fp16 = fp16_layers(stripped, scales)
    paths["fp16_layers"].write_text("".join(f"{name}\n" for name in fp16))
    entry["parity"].update({
        f: parity.check_part(model, part, module, paths[f], examples, f, seed, constants, paths["noqdq"])
        for f in ("qdq", "noqdq")
    })
    entry["batchnorm_nodes_in_qdq"] = sum(n.op_type == "BatchNormalization" for n in qdq.graph.node)
    return stripped, scales, fp16


def _commands(part: PartDef, files: dict[str, str], root: Path, fp16: list[str], plan: Plan, int8: bool) -> dict:
    """trtexec targets: GPU always; DLA with fallback for parts meant for it; a standalone loadable if it all fits."""
    flavours = {"fp16": files["onnx"], **({"qdq": files["qdq"], "noqdq": files["noqdq"]} if int8 else {})}
    formats = io_formats_from_onnx(root / files["noqdq"], root / files["cache"]) if int8 else None
    argv = commands(part.name, flavours, files["cache"] if int8 else None, fp16, formats, out_dir="engines")
    keep = {
        *GPU_TARGETS,
        *(("dla0", "dla1") if part.target == "dla" else ()),
        *(("dla_standalone",) if plan.fits_dla_entirely else ()),
    }
    return {target: args for target, args in argv.items() if target in keep}


def _placement(
    graph: onnx.ModelProto,
    label: str,
    precision: str,
    fp16: list[str],
    scales: dict | None,
    tag: str,
) -> tuple[dict, Plan]:
    verdicts = check_model(graph, precision, fp16, scales, trt_version=tag)  # rules of the bundle's TensorRT
    plan = partition(graph, verdicts)
    return {
        "graph": label,
        "precision": precision,
        "nodes": [v.to_dict() for v in verdicts],
        "plan": plan.to_dict(),
    }, plan


def _fp16_range(graph: onnx.ModelProto, examples: dict, seed: int, scales: dict[str, float], entry: dict) -> dict:
    """FP16 overflow check of the FP32 graph on the example and the parity inputs; DLA layers only with a DLA target."""
    dla = "dla0" in entry["commands"]
    on_dla = {n["name"] for n in entry["placement"]["nodes"] if dla and n["on_dla"]}
    return fp16_range.check(graph, [examples, random_inputs(examples, seed)], scales, on_dla)


def export_part(model: nn.Module, part: PartDef, acts: Activations, root: Path, tag: str, seed: int) -> dict:
    """All flavours of one part into root/models/<part>/, with parity, placement, roofline and build commands."""
    files = part_files(part.name)
    paths = {key: root / rel for key, rel in files.items()}
    paths["onnx"].parent.mkdir(parents=True, exist_ok=True)
    module = part.build(model).eval()
    examples = part.inputs(model, acts)
    outputs = _outputs(module, examples, part)
    entry = {
        "summary": part.summary,
        "target": part.target,
        "inputs": _specs(examples),
        "outputs": _specs(outputs),
        "params": param_count(module),
        "fidelity_max_abs": _fidelity(model, part, acts, outputs),
    }
    with flavour_mode(model, "fp32"):
        fp32 = export_onnx(module, examples, part.outputs, paths["onnx"])
    entry["parity"] = {"fp32": parity.check_part(model, part, module, paths["onnx"], examples, "fp32", seed)}
    int8 = any(type(m).__name__ == "TensorQuantizer" and not m._disabled for m in module.modules())
    fp16: list[str] = []
    scales: dict[str, float] = {}
    if int8:
        stripped, scales, fp16 = _int8(model, part, module, examples, paths, tag, seed, entry)
        entry["placement"], plan = _placement(stripped, "noqdq", "int8", fp16, scales, tag)
        rooflines = {"fp16": roofline(fp32, "fp16"), "int8": roofline(stripped, "int8", plan, fp16)}
    else:
        files = {"onnx": files["onnx"]}
        entry["placement"], plan = _placement(fp32, "onnx", "fp16", [], None, tag)
        rooflines = {"fp16": roofline(fp32, "fp16", plan)}
    entry.update(
        files=files,
        fp16_layers=fp16,
        roofline=rooflines,
        gflops=rooflines["fp16"]["gflops"],
        commands=_commands(part, files, root, fp16, plan, int8),
    )
    entry["fp16_range"] = _fp16_range(fp32, examples, seed, scales, entry)
    entry["commands"]["gpu_fp16"] += entry["fp16_range"]["gpu_fp32_flags"]  # overflowing layers stay FP32
    return entry


def _bev_pool_check(model: nn.Module, acts: Activations, seed: int) -> dict:
    """The scatter_add BEV pool exported alone and run in onnxruntime at 2 threads (it is a CUDA kernel on the Orin)."""
    module, examples = BEV_POOL.build(model).eval(), BEV_POOL.inputs(model, acts)
    fidelity = _fidelity(model, BEV_POOL, acts, _outputs(module, examples, BEV_POOL))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "camera.bev_pool.onnx"
        graph = export_onnx(module, examples, BEV_POOL.outputs, path)
        check = parity.check_part(model, BEV_POOL, module, path, examples, "fp32", seed)
    ops = sorted({node.op_type for node in graph.graph.node})
    return {"inputs": _specs(examples), "fidelity_max_abs": fidelity, "ops": ops, "parity": {"fp32": check}}


def _capture(model: nn.Module, batch: dict) -> Activations:
    """The parts' example tensors from one forward of the model; its failure named where it happened."""
    try:
        return capture(model, first_sample(batch))
    except Exception as err:  # the model's own code: whatever it raises, the export cannot go on without examples
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise ExportError(
            f"the model's forward on the first example failed at {frame.filename}:{frame.lineno} "
            f"({type(err).__name__}: {err}); the export takes every part's example inputs from one forward"
        ) from err


def _describe(model: nn.Module, folded: int) -> dict:
    """How the exported model was quantized and what happened to its BatchNorms."""
    if not is_quantized(model):
        return {
            "quantized": False,
            "bn": f"{folded} conv + BN pairs folded before export",
            "quantization": "none: FP32 ONNX only (GPU FP16); the Q/DQ ONNX, DLA calibration cache and FP16 list "
            "need a QAT / PTQ checkpoint",
        }
    meta = get_meta(model)
    bn = (
        f"{len(meta.folded_bn)} conv + BN pairs folded at quantization (QuantSpec.fold_bn)"
        if meta.folded_bn
        else "not folded at quantization: the exporter folds them in the FP32 ONNX, the Q/DQ ONNX keeps "
        "BatchNormalization nodes (TensorRT fuses them; QuantSpec(fold_bn=True) folds before calibration)"
    )
    spec = meta.spec
    return {
        "quantized": True,
        "bn": bn,
        "quantization": f"{meta.backend}, weights {spec.weight}, activations "
        f"{spec.activation}, {spec.calibrator} calibration, {len(meta.targets)} quantized modules",
    }


def export_bundle(
    model: nn.Module,
    cfg: object,
    batch: dict,
    root: Path,
    options: ExportOptions,
    source: dict,
    names: list[str],
    skipped: dict[str, str] | None = None,
    log: Log = print,
) -> dict:
    """Everything after the rebuild, written into `root`: parts, metadata, scripts, README and the report.

    Folds the BatchNorms of an unquantized model in place. Returns the report.
    """
    start, tag = time.perf_counter(), calib_tag(options.trt_version)
    folded = 0 if is_quantized(model) else len(fold_batchnorms(model))
    acts = _capture(model, batch)
    parts = {}
    for name in names:
        t = time.perf_counter()
        parts[name] = export_part(model, part_for(model, name), acts, root, tag, options.seed)
        verdicts = ", ".join(f"{f} {'ok' if p['passed'] else 'FAILED'}" for f, p in parts[name]["parity"].items())
        nodes = parts[name]["placement"]["nodes"]
        log(
            f"{name}: parity {verdicts}; {sum(n['on_dla'] for n in nodes)}/{len(nodes)} layers can run on the DLA "
            f"[{time.perf_counter() - t:.1f} s]"
        )
        warning = fp16_range.overflow_warning(name, parts[name]["fp16_range"])
        if warning:
            log(warning)
    classes = {
        "object": list(cfg.get("object_classes") or []),
        "map": list(model.heads["map"].classes) if "map" in model.heads else [],
    }
    write_metadata(root, config_yaml(cfg), classes)
    write_build_scripts(root, {name: entry["commands"] for name, entry in parts.items()})
    report = {
        "format": FORMAT,
        "source": {**source, **_describe(model, folded), "params": param_count(model)},
        "settings": {
            "trt_version": options.trt_version,
            "calib_tag": tag,
            "opset": OPSET,
            "seed": options.seed,
            "ort_threads": parity.ORT_THREADS,
            "tolerances": {f: dataclasses.asdict(t) for f, t in parity.TOLERANCES.items()},
        },
        "parts": parts,
        "skipped_parts": dict(skipped or {}),
        "kernels": kernel_contracts(model, acts),
        "bev_pool": _bev_pool_check(model, acts, options.seed)
        if "encoders.camera.vtransform" in acts and BEV_POOL.missing(model) is None else None,
        "engine_build": build_engines(root, parts, log) if options.build else {"status": "not requested (--build)"},
        "notes": _notes(model),
        "timing_s": {"rebuild": source.get("rebuild_s", 0.0), "export": time.perf_counter() - start},
    }
    report["timing_s"]["total"] = report["timing_s"]["rebuild"] + report["timing_s"]["export"]
    write_report(root, report)
    (root / "README.md").write_text(readme(report))
    return report


def _notes(model: nn.Module) -> list[str]:
    lidar = (
        "lidar.backbone is BEVFusion's spconv SparseEncoder: not an ONNX part. On the Orin it runs as a GPU kernel "
        "library (CUDA-BEVFusion's libspconv) with the tensor contract `lidar.sparse_encoder` above (voxels + int32 "
        "coordinates in, dense lidar_bev out, the fuser's input)."
        if sparse_lidar_encoder(model)
        else "lidar.backbone is the reference model's dense stand-in for BEVFusion's spconv encoder; in BEVFusion "
        "that stage is the CUDA spconv library, with the same output contract."
    )
    notes = ["Parts are batch 1 with static shapes; the camera parts take all N cameras of a frame as their batch.",
             lidar]
    if "heads.object" in model.heads and part_for(model, "head.object").upstream:
        notes.append(
            "head.object is BEVFusion's TransFusionHead through its own forward, top-k proposals included (one ONNX "
            "TopK, k = num_proposals <= TensorRT's 3840): PyTorch re-runs on onnxruntime's `dense_heatmap` and its "
            "picks (`query_proposals`, taken at the head's argsort cut where tied with PyTorch's), so near-tied picks "
            "compare like for like."
        )
    if not is_quantized(model):
        notes.append(
            "No quantizers in this checkpoint: only FP32 ONNX (GPU FP16 engines); DLA placement is checked "
            "at FP16. Export a QAT / PTQ checkpoint for the INT8 GPU and DLA flavours."
        )
    return notes


def build_engines(root: Path, parts: dict[str, dict], log: Log) -> dict:
    """--build: every target through the TensorRT Python API when TensorRT and a GPU are here, else say why not."""
    ok, reason = tensorrt_available()
    if not ok:
        log(f"TensorRT build skipped: {reason}")
        return {"status": f"skipped: {reason}", "engines": []}
    engines = [
        build_engine(**_engine_job(root, entry, target, argv))
        for entry in parts.values()
        for target, argv in entry["commands"].items()
    ]
    return {"status": f"built {len(engines)} engines with {reason}", "engines": engines}


def _flag(argv: list[str], flag: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"{flag}=")), None)


def _engine_job(root: Path, entry: dict, target: str, argv: list[str]) -> dict:
    """build_engine arguments equivalent to one trtexec command of the bundle."""
    artefact, flavour = GPU_TARGETS.get(target, ("noqdq", "noqdq"))
    core = _flag(argv, "--useDLACore")
    out = root / _flag(argv, "--saveEngine")
    out.parent.mkdir(parents=True, exist_ok=True)
    return {
        "onnx_path": root / entry["files"][artefact],
        "out_path": out,
        "flavour": flavour,
        "calib_cache": root / entry["files"]["cache"] if flavour == "noqdq" else None,
        "dla_core": None if core is None else int(core),
        "fp16_layers": entry["fp16_layers"],
        "fp32_layers": entry["fp16_range"]["gpu_fp32_layers"] if target == "gpu_fp16" else [],
        "standalone": target == "dla_standalone",
    }


def check_failures(report: dict, strict_dla: bool) -> list[str]:
    """Parity failures (and, with --strict-dla, DLA parts that do not fit the DLA entirely), one line each."""
    lines = parity.failures(report["parts"])
    if report["bev_pool"]:
        lines += parity.failures({"camera.bev_pool": report["bev_pool"]})
    for name, entry in report["parts"].items() if strict_dla else ():
        plan = entry["placement"]["plan"]
        if entry["target"] == "dla" and not plan["fits_dla_entirely"]:
            gpu = {op: s["reasons"] for op, s in plan["op_summary"].items() if s["gpu"]}
            lines.append(
                f"{name} is meant for the DLA but does not fit it entirely ({plan['dla_loadables']} DLA "
                f"loadables; GPU layers by op and reason: {gpu}); see the suggestions in report.md"
            )
    return lines


def run(options: ExportOptions, log: Log = print) -> dict:
    """Validate, rebuild, export into a staging directory, check, then publish the bundle at options.out."""
    start = time.perf_counter()
    problem = out_problem(options.out, options.force)
    if problem:
        raise ExportError(problem)
    _check_parts(options.parts)
    _check_trt_version(options.trt_version)
    model, cfg, batch = _load(options)
    names, skipped = _select(model, options.parts)
    state = read_checkpoint(options.checkpoint).get("meta", {}).get("compression")
    source = {
        "config": options.config,
        "checkpoint": options.checkpoint,
        "pruning_events": len(pruning_events(state)),
        "rebuild_s": time.perf_counter() - start,
    }
    log(f"rebuilt the model from {options.checkpoint} [{source['rebuild_s']:.1f} s]")
    with staged(options.out, options.force) as root:
        report = export_bundle(model, cfg, batch, root, options, source, names, skipped, log)
        problems = check_failures(report, options.strict_dla)
        if problems:
            raise ExportCheckFailed("the export failed its checks, no bundle was written:\n  " + "\n  ".join(problems))
    return report
