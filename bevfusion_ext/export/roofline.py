"""Projected Orin latency of an ONNX part from a roofline of its FLOPs and bytes. A projection, never a measurement.

Per layer: time = max(FLOPs / peak, bytes / bandwidth) at the layer's own precision (INT8, or FP16 for the layers the
bundle pins to FP16), plus a fixed launch cost per kernel. Pointwise layers TensorRT fuses into the layer producing
their input (Conv + BN + ReLU, Conv + residual Add) move no bytes of their own besides their other inputs. A planned
DLA + GPU split adds the DRAM round trip of every crossing tensor and a fixed cost per transition and per DLA loadable.
The fixed costs are assumptions, not measurements; benchmarks/roofline_check.py compares the whole projection with
NVIDIA's published Orin stage latencies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection
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
# Fixed costs (assumed, not measured): one GPU kernel launch, one DLA<->GPU transition (sync + reformat launch), one
# DLA loadable submission.
LAUNCH_MS = 0.005
TRANSITION_MS = 0.1
LOADABLE_MS = 0.1
ASSUMPTIONS = (
    "GPU: 170 sparse INT8 TOPS = 85 dense; FP16 dense 42.5 TFLOPS (half of INT8); FP32 5.3 TFLOPS "
    "(NVIDIA Jetson AGX Orin 64GB data sheet, MAXN; DOMAIN.md section 7).",
    "DLA: 2 cores with 105 sparse INT8 TOPS in total -> 52.5 dense -> 26.25 dense INT8 TOPS per core; FP16 assumed at "
    "half the INT8 rate (13.1 TFLOPS per core); no FP32 on the DLA.",
    "Memory: LPDDR5 204.8 GB/s, assumed fully available to whichever unit runs the layer (it is shared in reality).",
    "FLOPs: 2 per multiply-accumulate for Conv/ConvTranspose/Gemm/MatMul, the window size per output for pools, one "
    "per output element otherwise; reshape-like layers cost nothing.",
    "Bytes: weights and activations at 1 (INT8), 2 (FP16) or 4 (FP32) bytes per element at each layer's own precision "
    "(INT8 part: the FP16-pinned layers at 2); every activation a layer reads or writes counted once per layer; "
    "tensors crossing DLA<->GPU are written and read once more.",
    "Fusion: a pointwise layer whose input is produced by a Conv/ConvTranspose/Gemm/MatMul (or by a layer fused into "
    "one) and read by nothing else is fused into it, as TensorRT does: it moves only its other inputs' bytes.",
    f"Fixed costs (assumed): {LAUNCH_MS} ms per unfused layer (kernel launch), {TRANSITION_MS} ms per DLA<->GPU "
    f"transition, {LOADABLE_MS} ms per DLA loadable.",
)
BYTES_PER_ELEMENT = {"int8": 1, "fp16": 2, "fp32": 4}
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
POOL_OPS = frozenset({"MaxPool", "AveragePool"})
FUSING_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
POINTWISE_OPS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Gelu",
                           "BatchNormalization", "Add", "Sub", "Mul", "Div"})


@dataclass(frozen=True)
class LayerCost:
    """Work and traffic of one layer; `static` is False when its shapes were unknown (then counted as zero)."""

    name: str
    op_type: str
    flops: int
    weight_bytes: int
    activation_bytes: int
    static: bool = True
    precision: str = "int8"
    fused: bool = False

    def seconds(self, unit: str) -> float:
        """Roofline time on `unit` ("gpu" or "dla_core") at this layer's precision, with the Orin DRAM bandwidth."""
        compute = self.flops / PEAKS[unit][self.precision]
        return max(compute, (self.weight_bytes + self.activation_bytes) / DRAM_BYTES_PER_S)


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


def layer_cost(node: onnx.NodeProto, info: GraphInfo, precision: str, fused: bool = False) -> LayerCost:
    """FLOPs and bytes of one layer at `precision`; a fused layer moves only the inputs its producer did not make."""
    width = BYTES_PER_ELEMENT[precision]
    name, inputs = layer_name(node), info.data_inputs(node)
    activations = [*(inputs[1:] if fused else inputs), *([] if fused else [o for o in node.output if o])]
    if any(_numel(info, t) is None for t in [*inputs, *(o for o in node.output if o)]):
        return LayerCost(name, node.op_type, 0, 0, 0, static=False, precision=precision, fused=fused)
    if node.op_type in VIEW_OPS:
        return LayerCost(name, node.op_type, 0, 0, 0, precision=precision)
    weights = sum(info.const(i).size for i in node.input if i and info.const(i) is not None)
    flops = _flops(node, info, _numel(info, node.output[0]))
    moved = sum(_numel(info, t) for t in activations)
    return LayerCost(name, node.op_type, flops, weights * width, moved * width, precision=precision, fused=fused)


def fused_layers(model: onnx.ModelProto, info: GraphInfo | None = None) -> set[str]:
    """Pointwise layers TensorRT fuses into the layer producing their first input (see the module docstring)."""
    info = info or graph_info(model)
    layers = [n for n in model.graph.node if is_layer(n)]
    readers = Counter(t for n in layers for t in set(info.data_inputs(n)))
    producer = {o: n for n in layers for o in n.output}
    fused: set[str] = set()
    for node in layers:  # topological order: a producer is decided before its readers
        inputs = info.data_inputs(node)
        source = producer.get(inputs[0]) if inputs and node.op_type in POINTWISE_OPS else None
        if source is not None and readers[inputs[0]] == 1 and (
                source.op_type in FUSING_PRODUCERS or layer_name(source) in fused):
            fused.add(layer_name(node))
    return fused


def layer_costs(model: onnx.ModelProto, precision: str = "int8", fp16_layers: Collection[str] = (),
                info: GraphInfo | None = None) -> list[LayerCost]:
    """Costs of every layer of a part (Q/DQ looked through, as TensorRT folds them); `fp16_layers` run in FP16."""
    info = info or graph_info(model)
    fused = fused_layers(model, info)
    return [layer_cost(n, info, "fp16" if layer_name(n) in fp16_layers else precision, layer_name(n) in fused)
            for n in model.graph.node if is_layer(n)]


def _unit_ms(costs: list[LayerCost], unit: str) -> float | None:
    """All layers on one unit with a kernel launch each (None when a layer's precision does not exist there)."""
    if any(c.precision not in PEAKS[unit] for c in costs):
        return None
    launches = sum(not c.fused and c.op_type not in VIEW_OPS for c in costs)
    return 1e3 * sum(c.seconds(unit) for c in costs) + LAUNCH_MS * launches


def _plan_ms(costs: list[LayerCost], plan: Plan, model: onnx.ModelProto, info: GraphInfo, precision: str) -> float:
    """Each layer on the unit the plan puts it on, plus each crossing tensor's DRAM round trip and the fixed costs."""
    device = {name: s.device for s in plan.segments for name in s.layers}
    unit = {"DLA": "dla_core", "GPU": "gpu"}
    graph_inputs = {i.name for i in model.graph.input}
    crossing = [t for s in plan.segments for t in s.inputs if t not in graph_inputs]
    crossing_bytes = 2 * BYTES_PER_ELEMENT[precision] * sum(_numel(info, t) or 0 for t in crossing)
    gpu_launches = sum(not c.fused and c.op_type not in VIEW_OPS and device[c.name] == "GPU" for c in costs)
    fixed = LAUNCH_MS * gpu_launches + TRANSITION_MS * plan.transitions + LOADABLE_MS * plan.dla_loadables
    return 1e3 * sum(c.seconds(unit[device[c.name]]) for c in costs) + 1e3 * crossing_bytes / DRAM_BYTES_PER_S + fixed


def roofline(model: onnx.ModelProto, precision: str = "int8", plan: Plan | None = None,
             fp16_layers: Collection[str] = ()) -> dict:
    """JSON-ready projection for one part: totals, GPU-only / one-DLA-core / planned latency and the peaks used."""
    if precision not in BYTES_PER_ELEMENT:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_ELEMENT)}, got {precision!r}")
    info = graph_info(model)
    costs = layer_costs(model, precision, fp16_layers, info)
    dla_peak = PEAKS["dla_core"].get(precision)
    projected = {"gpu": _unit_ms(costs, "gpu"), "dla_core": dla_peak and _unit_ms(costs, "dla_core")}
    if plan is not None and dla_peak:
        projected["plan"] = _plan_ms(costs, plan, model, info, precision)
    return {
        "label": "projection",
        "method": "sum over layers of max(FLOPs / peak, bytes / DRAM bandwidth) at each layer's precision, fused "
                  "pointwise layers, fixed launch / transition / loadable costs; ideal utilisation",
        "precision": precision,
        "layer_precisions": dict(Counter(c.precision for c in costs)),
        "fused_layers": sum(c.fused for c in costs),
        "peaks_used": {
            "gpu_ops_per_s": PEAKS["gpu"][precision],
            "dla_core_ops_per_s": dla_peak,
            "dram_bytes_per_s": DRAM_BYTES_PER_S,
        },
        "fixed_ms": {"launch": LAUNCH_MS, "transition": TRANSITION_MS, "loadable": LOADABLE_MS},
        "assumptions": list(ASSUMPTIONS),
        "gflops": sum(c.flops for c in costs) / 1e9,
        "weight_mb": sum(c.weight_bytes for c in costs) / 1e6,
        "activation_mb": sum(c.activation_bytes for c in costs) / 1e6,
        "projected_ms": projected,
        "layers_with_unknown_shapes": [c.name for c in costs if not c.static],
        "layers": [asdict(c) for c in costs],
    }
