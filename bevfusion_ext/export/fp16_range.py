"""FP16 overflow check of an exported part: the FP32 ONNX passes parity on the CPU, but on the Orin every layer that is
not INT8 runs in FP16 (the DLA has no FP32, the GPU engines are built with --fp16), where |x| > 65504 becomes inf.

Measured, not estimated: onnxruntime runs the FP32 graph with every float layer output added as a graph output, on the
inputs the export already has (the captured example and the parity inputs); the graph inputs are checked as fed.

Which tensors count: all float tensors. The `gpu_fp16` engine every bundle builds runs the whole FP32 graph in FP16, so
any of them over the limit overflows there. In the INT8 engines a tensor with a calibration scale saturates at its amax
instead wherever TensorRT runs its layers in INT8, so such findings are kept and marked `int8: true` (they concern the
FP16 engine and any layer TensorRT keeps in FP16). Findings on layers planned on the DLA are marked `on_dla: true`:
the DLA has no FP32, so pinning them to FP32 means moving them to the GPU.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from .dla_rules import FLOAT_TYPES, GraphInfo, graph_info, is_layer, layer_name
from .parity import run_onnx
from .trtexec import fp32_flags

FP16_MAX = 65504.0
# The export sees a few samples; real inputs (other scenes, sensors, calibrations) go further. Under FP16_MAX / 8 a
# tensor keeps 3 binades of headroom: it is called at risk only above that, i.e. when 8x the measured peak overflows.
AT_RISK_ABOVE = FP16_MAX / 8
# Layer outputs tapped per onnxruntime run: all of a full-size camera backbone's at once is over 10 GB.
TAP_BYTES = 1 << 30


@dataclass(frozen=True)
class TensorRange:
    """max |x| of one float tensor over the measured inputs; `layer` produces it (None: a graph input)."""

    tensor: str
    layer: str | None
    max_abs: float  # over the finite values
    nonfinite: bool  # inf or nan already in FP32


def _float_activations(model: onnx.ModelProto, info: GraphInfo) -> dict[str, str | None]:
    """Every float graph input and layer output, in graph order, with the layer producing it."""
    initializers = {i.name for i in model.graph.initializer}
    found: dict[str, str | None] = {i.name: None for i in model.graph.input if i.name not in initializers}
    found.update({o: layer_name(n) for n in model.graph.node if is_layer(n) for o in n.output if o})
    return {name: layer for name, layer in found.items() if info.elem_types.get(name) in FLOAT_TYPES}


def _tapped(model: onnx.ModelProto, tensors: Iterable[str], info: GraphInfo) -> onnx.ModelProto:
    """A copy of `model` that also outputs `tensors`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    tapped = [t for t in tensors if t not in present]
    out.graph.output.extend(helper.make_tensor_value_info(t, info.elem_types[t], None) for t in tapped)
    return out


def _tap_chunks(tensors: list[str], info: GraphInfo) -> list[list[str]]:
    """Split the tensors to tap into runs of at most TAP_BYTES of float32 outputs (unknown shapes count as full)."""
    chunks: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        shape = info.shape(name)
        nbytes = 4 * math.prod(shape) if shape and None not in shape else TAP_BYTES
        if chunks[-1] and size + nbytes > TAP_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += nbytes
    return chunks


def activation_ranges(model: onnx.ModelProto, feeds: Iterable[dict[str, torch.Tensor]]) -> list[TensorRange]:
    """max |x| of every float graph input and layer output of `model` over `feeds` (onnxruntime), in graph order."""
    info = graph_info(model)
    activations = _float_activations(model, info)
    peak, nonfinite = dict.fromkeys(activations, 0.0), dict.fromkeys(activations, False)
    feeds = list(feeds)

    def record(values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name in activations:
                x = np.abs(value)
                finite = np.isfinite(x)
                peak[name] = max(peak[name], float(x[finite].max(initial=0.0)))
                nonfinite[name] = nonfinite[name] or not finite.all()

    for feed in feeds:
        record({name: x.numpy() for name, x in feed.items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tapped.onnx"
        for chunk in _tap_chunks([t for t, layer in activations.items() if layer], info):
            onnx.save(_tapped(model, chunk, info), str(path))
            for feed in feeds:
                record(run_onnx(path, feed))
    return [TensorRange(name, layer, peak[name], nonfinite[name]) for name, layer in activations.items()]


def fp32_layers(model: onnx.ModelProto, tensors: Collection[str]) -> list[str]:
    """Layers producing or reading `tensors`, in graph order: those must run in FP32 for the tensors to stay FP32."""
    info = graph_info(model)
    return [
        layer_name(n)
        for n in model.graph.node
        if is_layer(n) and ({*n.output} | {info.source(i) for i in n.input if i}) & set(tensors)
    ]


def check(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, torch.Tensor]],
    int8_tensors: Collection[str] = (),
    dla_layers: Collection[str] = (),
) -> dict:
    """A part's report entry: its largest activation, the tensors over (or near) FP16's range, and the GPU fix."""
    ranges = activation_ranges(model, feeds)
    overflow = [r for r in ranges if r.nonfinite or r.max_abs > FP16_MAX]
    at_risk = [r for r in ranges if not r.nonfinite and AT_RISK_ABOVE < r.max_abs <= FP16_MAX]
    largest = max(ranges, key=lambda r: r.max_abs, default=TensorRange("", None, 0.0, False))
    pinned = fp32_layers(model, [r.tensor for r in overflow])

    def findings(found: list[TensorRange]) -> list[dict]:
        return [{**asdict(r), "int8": r.tensor in int8_tensors, "on_dla": r.layer in dla_layers} for r in found]

    return {
        "fp16_max": FP16_MAX,
        "at_risk_above": AT_RISK_ABOVE,
        "tensors_checked": len(ranges),
        "max_abs": largest.max_abs,
        "max_abs_tensor": largest.tensor,
        "max_abs_layer": largest.layer,
        "overflow": findings(overflow),
        "at_risk": findings(at_risk),
        "gpu_fp32_layers": pinned,
        "gpu_fp32_flags": fp32_flags(pinned),
    }


def _where(finding: dict) -> str:
    value = "inf/nan" if finding["nonfinite"] else f"{finding['max_abs']:.4g}"
    tensor, layer = finding["tensor"], finding["layer"]
    return f"{f'layer {layer} (tensor {tensor})' if layer else f'input {tensor}'} reaches max |x| {value}"


def overflow_warning(part: str, result: dict) -> str | None:
    """One log line for a part whose activations exceed FP16 on the sample inputs, naming the first one and the fix."""
    if not result["overflow"]:
        return None
    first, more = result["overflow"][0], len(result["overflow"]) - 1
    pinned, dla = len(result["gpu_fp32_layers"]), sum(f["on_dla"] for f in result["overflow"])
    return (
        f"WARNING {part}: FP16 overflow (> {FP16_MAX:g}) on the Orin: {_where(first)}"
        + (f", {more} more tensor(s) after it" if more else "")
        + "; FP32 parity cannot show this. Rescale / normalise its input, quantize the layer to INT8, or keep the "
        f"{pinned} layer(s) producing or reading them in FP32 on the GPU (trtexec --layerPrecisions=<layer>:fp32 "
        "--precisionConstraints=obey; exact flags for gpu_fp16 in report.md, FP16 range)"
        + (f"; {dla} of these layers are planned on the DLA, which has no FP32" if dla else "")
    )
