"""Projected Orin latency of an ONNX part from a roofline of its FLOPs and bytes. A projection, never a measurement.

Per layer: time = max(FLOPs / peak, bytes / bandwidth), summed over layers: ideal utilisation, no launch or reformat
overhead beyond the bytes of tensors crossing a DLA<->GPU boundary, so it is a lower bound to check measured engines
against (scripts/benchmark.sh), not a substitute for them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

from .dla_rules import GraphInfo, attr, graph_info, is_layer, layer_name
from .partition import Plan

TERA = 1e12
# Jetson AGX Orin 64GB, MAXN. Ops/s per unit and precision (dense: no 2:4 structured sparsity).
PEAKS = {
    "gpu": {"int8": 85 * TERA, "fp16": 42.5 * TERA, "fp32": 5.3 * TERA},
    "dla_core": {"int8": 26.25 * TERA, "fp16": 13.125 * TERA},
}
DRAM_BYTES_PER_S = 204.8e9
ASSUMPTIONS = (
    "GPU: 170 sparse INT8 TOPS = 85 dense; FP16 dense 42.5 TFLOPS (half of INT8); FP32 5.3 TFLOPS "
    "(NVIDIA Jetson AGX Orin 64GB data sheet, MAXN; DOMAIN.md section 7).",
    "DLA: 2 cores with 105 sparse INT8 TOPS in total -> 52.5 dense -> 26.25 dense INT8 TOPS per core; FP16 assumed at "
    "half the INT8 rate (13.1 TFLOPS per core); no FP32 on the DLA.",
    "Memory: LPDDR5 204.8 GB/s, assumed fully available to whichever unit runs the layer (it is shared in reality).",
    "FLOPs: 2 per multiply-accumulate for Conv/ConvTranspose/Gemm/MatMul, the window size per output for pools, one "
    "per output element otherwise; reshape-like layers cost nothing.",
    "Bytes: weights and activations at 1 (INT8), 2 (FP16) or 4 (FP32) bytes per element, every activation a layer "
    "reads or writes counted once per layer; tensors crossing DLA<->GPU are written and read once more.",
)
BYTES_PER_ELEMENT = {"int8": 1, "fp16": 2, "fp32": 4}
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
POOL_OPS = frozenset({"MaxPool", "AveragePool"})


@dataclass(frozen=True)
class LayerCost:
    """Work and traffic of one layer; `static` is False when its shapes were unknown (then counted as zero)."""

    name: str
    op_type: str
    flops: int
    weight_bytes: int
    activation_bytes: int
    static: bool = True

    def seconds(self, ops_per_s: float) -> float:
        """Roofline time on a unit with `ops_per_s` and the Orin DRAM bandwidth."""
        return max(self.flops / ops_per_s, (self.weight_bytes + self.activation_bytes) / DRAM_BYTES_PER_S)


def _numel(info: GraphInfo, name: str) -> int | None:
    shape = info.shape(name)
    return None if shape is None or None in shape else math.prod(shape)


def _macs_per_output(node: onnx.NodeProto, info: GraphInfo) -> int:
    """Multiply-accumulates behind each output element of a Conv/Gemm/MatMul."""
    if node.op_type == "Conv":
        return math.prod(info.shape(node.input[1])[1:])  # Cin/group * kH * kW
    a = info.shape(node.input[0])
    return a[-2] if node.op_type == "Gemm" and attr(node, "transA", 0) else a[-1]


def _flops(node: onnx.NodeProto, info: GraphInfo, outputs: int) -> int:
    op = node.op_type
    if op in VIEW_OPS:
        return 0
    if op in ("Conv", "Gemm", "MatMul"):
        return 2 * outputs * _macs_per_output(node, info)
    if op == "ConvTranspose":  # every input element scatters into Cout/group * kH * kW outputs
        return 2 * _numel(info, node.input[0]) * math.prod(info.shape(node.input[1])[1:])
    if op in POOL_OPS:
        return outputs * math.prod(attr(node, "kernel_shape"))
    if op.startswith(("Global", "Reduce")):
        return _numel(info, node.input[0])
    return outputs


def layer_cost(node: onnx.NodeProto, info: GraphInfo, precision: str) -> LayerCost:
    """FLOPs and bytes of one layer at `precision` (int8, fp16 or fp32)."""
    width = BYTES_PER_ELEMENT[precision]
    name, activations = layer_name(node), [*info.data_inputs(node), *(o for o in node.output if o)]
    sizes = [_numel(info, t) for t in activations]
    if None in sizes:
        return LayerCost(name, node.op_type, 0, 0, 0, static=False)
    if node.op_type in VIEW_OPS:
        return LayerCost(name, node.op_type, 0, 0, 0)
    weights = sum(info.const(i).size for i in node.input if i and info.const(i) is not None)
    flops = _flops(node, info, _numel(info, node.output[0]))
    return LayerCost(name, node.op_type, flops, weights * width, sum(sizes) * width)


def layer_costs(model: onnx.ModelProto, precision: str = "int8") -> list[LayerCost]:
    """Costs of every layer of a part (Q/DQ looked through, as TensorRT folds them)."""
    info = graph_info(model)
    return [layer_cost(n, info, precision) for n in model.graph.node if is_layer(n)]


def _ms(costs: list[LayerCost], ops_per_s: float) -> float:
    return 1e3 * sum(c.seconds(ops_per_s) for c in costs)


def _plan_ms(costs: list[LayerCost], plan: Plan, model: onnx.ModelProto, precision: str) -> float:
    """Each layer at the peak of the unit the plan puts it on, plus the DRAM round trip of every crossing tensor."""
    device = {name: s.device for s in plan.segments for name in s.layers}
    peak = {"DLA": PEAKS["dla_core"][precision], "GPU": PEAKS["gpu"][precision]}
    info, graph_inputs = graph_info(model), {i.name for i in model.graph.input}
    crossing = [t for s in plan.segments for t in s.inputs if t not in graph_inputs]
    crossing_bytes = 2 * BYTES_PER_ELEMENT[precision] * sum(_numel(info, t) or 0 for t in crossing)
    return 1e3 * sum(c.seconds(peak[device[c.name]]) for c in costs) + 1e3 * crossing_bytes / DRAM_BYTES_PER_S


def roofline(model: onnx.ModelProto, precision: str = "int8", plan: Plan | None = None) -> dict:
    """JSON-ready projection for one part: totals, GPU-only / one-DLA-core / planned latency and the peaks used."""
    if precision not in BYTES_PER_ELEMENT:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_ELEMENT)}, got {precision!r}")
    costs = layer_costs(model, precision)
    dla_peak = PEAKS["dla_core"].get(precision)
    projected = {"gpu": _ms(costs, PEAKS["gpu"][precision]), "dla_core": dla_peak and _ms(costs, dla_peak)}
    if plan is not None and dla_peak:
        projected["plan"] = _plan_ms(costs, plan, model, precision)
    return {
        "label": "projection",
        "method": "sum over layers of max(FLOPs / peak, bytes / DRAM bandwidth); ideal utilisation, a lower bound",
        "precision": precision,
        "peaks_used": {
            "gpu_ops_per_s": PEAKS["gpu"][precision],
            "dla_core_ops_per_s": dla_peak,
            "dram_bytes_per_s": DRAM_BYTES_PER_S,
        },
        "assumptions": list(ASSUMPTIONS),
        "gflops": sum(c.flops for c in costs) / 1e9,
        "weight_mb": sum(c.weight_bytes for c in costs) / 1e6,
        "activation_mb": sum(c.activation_bytes for c in costs) / 1e6,
        "projected_ms": projected,
        "layers_with_unknown_shapes": [c.name for c in costs if not c.static],
        "layers": [asdict(c) for c in costs],
    }
