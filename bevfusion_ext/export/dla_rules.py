"""Static Orin DLA placement check for ONNX graphs: one verdict per layer with a reason code, the NVIDIA document
section the rule comes from, and a rewrite hint.

The rules are those of TensorRT on Orin, each cited in `CITATIONS` (reason code -> NVIDIA section and the TensorRT
versions it holds for); rules that changed between releases are keyed by the bundle's TensorRT target (`trt_version`,
the export's --trt-version, default 10.3 = JetPack 6). They live in a registry (`OP_RULES`: op type -> small rule
functions, then `GENERAL_RULES` for every layer), so adding a limit is adding one function and its citation. Q/DQ,
Constant and Identity nodes are not layers: TensorRT folds them, so the checker looks through them (a DQ(Q(weight))
input is a constant, a DQ(Q(x)) input is `x` with x's scale).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRECISIONS = ("int8", "fp16")
TRANSPARENT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Constant", "Identity"})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
MAX_DIM = 8192  # non-batch dims (C, H, W)
MAX_BATCH = 4096  # product of all dims before C, H, W
SOFTMAX_MAX_AXIS = 1024  # axis length of the DLA softmax's optimized mode
CLIP_MAX_RANGE = (1.0, 127.0)  # upper bound of a clipped ReLU on the DLA
DEFAULT_TRT_VERSION = "10.3"  # the export CLI's default --trt-version (JetPack 6.1 / 6.2)
Shape = tuple[int | None, ...]
TrtVersion = tuple[int, int, int]


def parse_trt_version(text: str) -> TrtVersion:
    """(major, minor, patch) of "10.3", "8.6.12" or a calibration-cache tag ("TRT-100300-EntropyCalibration2")."""
    if text.startswith("TRT-"):
        number = int(text.split("-")[1])
        return (
            (number // 10000, number // 100 % 100, number % 100)
            if number >= 100000
            else (number // 1000, number // 100 % 10, number % 100)
        )
    parts = text.split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a TensorRT version like 10.3 or 8.6.1")
    major, minor, patch = (int(p) for p in (parts + ["0", "0"])[:3])
    return major, minor, patch


def version_text(version: TrtVersion) -> str:
    """(8, 6, 12) -> "8.6.12"."""
    return ".".join(map(str, version))


@dataclass(frozen=True)
class NodeVerdict:
    """Where one layer can run and why; `reason` is a stable code ("OK", "CONV_KERNEL_GT_32", "UNSUPPORTED_OP:Erf")."""

    name: str
    op_type: str
    on_dla: bool
    reason: str
    detail: str = ""
    suggestion: str | None = None
    source: str = ""  # the NVIDIA section (and TensorRT versions) the failing rule comes from

    def to_dict(self) -> dict:
        """Plain dict, for JSON reports."""
        return asdict(self)


@dataclass(frozen=True)
class Failure:
    """A rule's rejection: the code, what was seen, and (optionally) a rewrite that would make it fit."""

    code: str
    detail: str
    suggestion: str | None = None


@dataclass
class GraphInfo:
    """What the rules need: static shapes, element types, constants, Q/DQ aliases and per-tensor INT8 scales."""

    shapes: dict[str, Shape | None]
    elem_types: dict[str, int]
    consts: dict[str, np.ndarray]
    alias: dict[str, str]
    scales: dict[str, float]
    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    trt_version: TrtVersion = field(default_factory=lambda: parse_trt_version(DEFAULT_TRT_VERSION))

    def source(self, name: str) -> str:
        """The tensor `name` really is once Q/DQ/Identity are looked through (so scales and constants are found)."""
        while name in self.alias:
            name = self.alias[name]
        return name

    def const(self, name: str) -> np.ndarray | None:
        """The constant behind `name` (through Q/DQ), or None for an activation."""
        return self.consts.get(self.source(name))

    def shape(self, name: str) -> Shape | None:
        """Static-or-not shape of `name`; None when shape inference could not tell."""
        return self.shapes.get(name) or self.shapes.get(self.source(name))

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        """Non-constant inputs (source names): the activations a layer reads."""
        return [self.source(i) for i in node.input if i and self.const(i) is None]

    def batch(self, name: str) -> int | None:
        """DLA batch of a tensor: the product of all dims before C, H, W (None if unknown)."""
        shape = self.shape(name)
        if not shape or None in shape:
            return None
        return math.prod(as_nchw(shape)[:-3])


def as_nchw(shape: Shape) -> Shape:
    """Rank >= 4 as is; lower ranks as TensorRT's fully connected view ([M, K] -> [M, K, 1, 1])."""
    return tuple(shape) + (1,) * (4 - len(shape))


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's Python value (strings decoded), or `default`."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def layer_name(node: onnx.NodeProto) -> str:
    """TensorRT's layer name: the ONNX node name, or its first output for unnamed nodes."""
    return node.name or node.output[0]


def is_layer(node: onnx.NodeProto) -> bool:
    """Q/DQ, Constant and Identity are folded by TensorRT, everything else becomes a layer."""
    return node.op_type not in TRANSPARENT_OPS


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    a = node.attribute[0]
    return numpy_helper.to_array(a.t) if a.name == "value" else np.array(helper.get_attribute_value(a))


def _shape_of(vi: onnx.ValueInfoProto) -> Shape | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)


def _qdq_scales(nodes: Iterable[onnx.NodeProto], info: GraphInfo) -> dict[str, float]:
    """Per-tensor scales of activation quantizers, keyed by the quantized float tensor; conflicts keep the larger."""
    scales: dict[str, float] = {}
    for q in (n for n in nodes if n.op_type == "QuantizeLinear" and info.const(n.input[0]) is None):
        scale = info.const(q.input[1])
        zero = info.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if scale is None or scale.size != 1:
            raise ValueError(f"{q.name}: activation quantizer must have one constant scale (TensorRT is per-tensor)")
        if zero is not None and np.any(zero != 0):
            raise ValueError(f"{q.name}: activation zero point must be 0 (TensorRT INT8 is symmetric)")
        key, value = info.source(q.input[0]), float(np.float32(scale.reshape(())))
        if key in scales and scales[key] != value:
            msg = f"tensor {key} has quantizers with scales {scales[key]} and {value}; keeping the larger"
            warnings.warn(msg, stacklevel=3)
            value = max(value, scales[key])
        scales[key] = value
    return scales


def graph_info(
    model: onnx.ModelProto, scales: dict[str, float] | None = None, trt_version: str = DEFAULT_TRT_VERSION
) -> GraphInfo:
    """Run ONNX shape inference once and index the graph; `scales` adds a calibration cache's to the Q/DQ scales."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts.update({n.output[0]: _constant_value(n) for n in g.node if n.op_type == "Constant"})
    value_infos = [*g.input, *g.output, *g.value_info]
    shapes: dict[str, Shape | None] = {vi.name: _shape_of(vi) for vi in value_infos}
    shapes.update({k: tuple(v.shape) for k, v in consts.items()})
    info = GraphInfo(
        shapes=shapes,
        elem_types={vi.name: vi.type.tensor_type.elem_type for vi in value_infos},
        consts=consts,
        alias={n.output[0]: n.input[0] for n in g.node if n.op_type in TRANSPARENT_OPS - {"Constant"}},
        scales={},
        producers={o: n for n in g.node for o in n.output},
        consumers={},
        trt_version=parse_trt_version(trt_version),
    )
    for n in g.node:
        for i in n.input:
            info.consumers.setdefault(i, []).append(n)
    info.scales = {**_qdq_scales(g.node, info), **(scales or {})}
    return info


# ---------------------------------------------------------------------------------------------------------- helpers
Rule = Callable[[onnx.NodeProto, GraphInfo, str], Failure | None]


def _limit(
    code: str, what: str, get: Callable[[onnx.NodeProto, GraphInfo], Sequence[int] | None], lo: int, hi: int
) -> Rule:
    """A rule rejecting with `code` when any value `get` returns lies outside [lo, hi]."""

    def rule(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
        values = get(node, info)
        if values is None or all(lo <= v <= hi for v in values):
            return None
        return Failure(code, f"{what} {list(values)} outside [{lo}, {hi}]")

    return rule


def _const_input(index: int, code: str) -> Rule:
    """A rule rejecting with `code` when input `index` is an activation rather than a build-time constant."""

    def rule(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
        if len(node.input) > index and info.const(node.input[index]) is None:
            return Failure(code, f"input {index} '{node.input[index]}' is not a build-time constant")
        return None

    return rule


def _fp16_only(code: str) -> Rule:
    """A rule for layers DLA runs only in FP16 on Orin: rejected unless the layer is kept in FP16."""

    def rule(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
        if precision != "fp16":
            return Failure(code, f"{node.op_type} runs on the DLA in FP16 only, layer precision is {precision}")
        return None

    return rule


def _spatial_2d(code: str) -> Rule:
    """A rule rejecting 3D (and higher) convolutions / pools: the DLA is 2D only."""

    def rule(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
        kernel = _kernel(node, info)
        if kernel is not None and len(kernel) > 2:
            return Failure(code, f"{len(kernel)}D kernel {list(kernel)}")
        return None

    return rule


def _rank(node: onnx.NodeProto, info: GraphInfo) -> int | None:
    shape = info.shape(node.output[0])
    return None if shape is None else len(shape)


def _axis(node: onnx.NodeProto, info: GraphInfo, default: int) -> tuple[int, int] | None:
    """(normalised axis, rank) from the `axis` attribute; None below rank 4 (the rank rule reports those)."""
    rank = _rank(node, info)
    return None if rank is None or rank < 4 else (attr(node, "axis", default) % rank, rank)


def _kernel(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int] | None:
    kernel = attr(node, "kernel_shape")
    if kernel is None and len(node.input) > 1:
        weight = info.shape(node.input[1])
        kernel = weight[2:] if weight else None
    return kernel


def _n_spatial(node: onnx.NodeProto, info: GraphInfo) -> int:
    kernel = _kernel(node, info)
    return len(kernel) if kernel is not None else 2


def _strides(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int]:
    return attr(node, "strides", [1] * _n_spatial(node, info))


def _dilations(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int]:
    return attr(node, "dilations", [1] * _n_spatial(node, info))


def _pads(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int] | None:
    """Explicit begin/end pads; auto_pad SAME_* resolved from the input shape like ONNX does."""
    n, auto = _n_spatial(node, info), attr(node, "auto_pad", "NOTSET")
    if auto == "NOTSET":
        return attr(node, "pads", [0] * 2 * n)
    if auto == "VALID":
        return [0] * 2 * n
    shape = info.shape(node.input[0])
    if shape is None or None in shape[-n:]:
        return None
    geometry = zip(shape[-n:], _kernel(node, info), _strides(node, info), _dilations(node, info), strict=True)
    total = [max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0) for i, k, s, d in geometry]
    small = [t // 2 for t in total]
    big = [t - t // 2 for t in total]
    return small + big if auto == "SAME_UPPER" else big + small


# ------------------------------------------------------------------------------------------------------- op rules
def _conv_pads(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    pads, kernel = _pads(node, info), _kernel(node, info)
    if pads is None or kernel is None:
        return None
    n = len(kernel)
    if all(0 <= p < k for i, k in enumerate(kernel) for p in (pads[i], pads[i + n])):
        return None
    return Failure("CONV_PAD_GE_KERNEL", f"pads {list(pads)} with kernel {list(kernel)}: need 0 <= pad < kernel, <= 31")


def _conv_cout(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int] | None:
    weight = info.shape(node.input[1])
    return [weight[0]] if weight and weight[0] is not None else None


def _deconv_kernel(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    """Each kernel dim in [1, 32], except the 1 x {64, 96, 128} / {64, 96, 128} x 1 kernels the DLA also runs."""
    kernel = _kernel(node, info)
    if kernel is None or all(1 <= k <= 32 for k in kernel):
        return None
    if len(kernel) == 2 and sorted(kernel)[0] == 1 and sorted(kernel)[1] in (64, 96, 128):
        return None
    return Failure(
        "DECONV_KERNEL_GT_32", f"kernel {list(kernel)} outside [1, 32] (1x64/96/128 and 64/96/128x1 allowed)"
    )


def _deconv_square(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    """TensorRT disabled square deconvolution kernels and strides of 23..32 on the DLA (compile time)."""
    for what, values in (("kernel", _kernel(node, info)), ("stride", _strides(node, info))):
        if values is not None and len(set(values)) == 1 and 23 <= values[0] <= 32:
            return Failure("DECONV_SQUARE_23_32", f"square {what} {list(values)} in [23, 32]")
    return None


def _deconv_pads(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int]:
    implicit = [1] if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") else []
    return [*attr(node, "pads", []), *attr(node, "output_padding", []), *implicit]


def _group(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int]:
    return [attr(node, "group", 1)]


def _pool_window(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int]:
    return attr(node, "kernel_shape", [])


def _as_4d(shape: Shape) -> Shape:
    return (1,) * (4 - len(shape)) + tuple(shape)


def _eltwise_broadcast(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    """DLA broadcasts an operand only as N,C,H,W (same), N,C,1,1 or N,1,1,1."""
    out = info.shape(node.output[0])
    if out is None or len(out) != 4:
        return None
    allowed = {tuple(out[1:]), (out[1], 1, 1), (1, 1, 1)}
    for name in node.input:
        shape = info.shape(name)
        if shape is not None and len(shape) <= 4 and tuple(_as_4d(shape)[1:]) not in allowed:
            return Failure("ELTWISE_BROADCAST", f"operand '{name}' {list(shape)} broadcast to {list(out)}")
    return None


def _same_int8_range(code: str) -> Rule:
    """A rule for layers whose INT8 input ranges must all equal the output range on the DLA (Concat, pooling)."""

    def rule(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
        tensors = [*info.data_inputs(node), node.output[0]]
        scales = {t: np.float32(info.scales[t]) for t in tensors if t in info.scales}
        if precision != "int8" or len(set(scales.values())) < 2:
            return None
        return Failure(code, "INT8 scales differ: " + ", ".join(f"'{t}' {s:.6g}" for t, s in scales.items()))

    return rule


def _const_operands(code: str, allowed: tuple[int, ...]) -> Rule:
    """A rule for elementwise ops the DLA runs only with `allowed` counts of build-time constant operands."""

    def rule(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
        consts = sum(info.const(i) is not None for i in node.input[:2])
        if consts in allowed:
            return None
        return Failure(
            code, f"{consts} constant operand(s); the DLA {node.op_type} takes {' or '.join(map(str, allowed))}"
        )

    return rule


def _clip_bound(node: onnx.NodeProto, info: GraphInfo, index: int, name: str, default: float) -> float | None:
    """Clip's min/max: input `index` (opset >= 11, None if not a constant), attribute `name`, or `default`."""
    if len(node.input) > index and node.input[index]:
        value = info.const(node.input[index])
        return None if value is None else float(value.reshape(-1)[0])
    return float(attr(node, name, default))


def _clipped_relu(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    """The DLA runs Clip only as a clipped ReLU: min 0, constant max in [1, 127]."""
    lo, hi = _clip_bound(node, info, 1, "min", -math.inf), _clip_bound(node, info, 2, "max", math.inf)
    if lo is None or hi is None:
        return Failure("CLIP_NOT_RELU", "min/max are not build-time constants")
    if lo != 0.0:
        return Failure("CLIP_NOT_RELU", f"min {lo}: the DLA clips as a ReLU (min 0) only")
    if not CLIP_MAX_RANGE[0] <= hi <= CLIP_MAX_RANGE[1]:
        return Failure("CLIP_MAX_RANGE", f"max {hi} outside [{CLIP_MAX_RANGE[0]:g}, {CLIP_MAX_RANGE[1]:g}]")
    return None


def _concat_on_c(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    axis = _axis(node, info, 1)
    if axis is None or axis[0] == axis[1] - 3:
        return None
    return Failure("CONCAT_NOT_ON_C", f"axis {axis[0]} of a rank-{axis[1]} tensor; C is axis {axis[1] - 3}")


def _softmax_axis(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    axis = _axis(node, info, -1)
    if axis is None or axis[0] >= axis[1] - 3:
        return None
    return Failure("SOFTMAX_AXIS", f"axis {axis[0]} is a batch axis; DLA softmax runs over C, H or W")


def _softmax_axis_length(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    """Axis length <= 1024 unless every other C/H/W dim is 1 (the accurate mode); unknown shapes are left to others."""
    axis, shape = _axis(node, info, -1), info.shape(node.output[0])
    if axis is None or shape is None or None in shape:
        return None
    others = [shape[d] for d in range(axis[1] - 3, axis[1]) if d != axis[0]]
    if all(d == 1 for d in others) or shape[axis[0]] <= SOFTMAX_MAX_AXIS:
        return None
    return Failure(
        "SOFTMAX_AXIS_GT_1024", f"axis length {shape[axis[0]]} > {SOFTMAX_MAX_AXIS} with other C/H/W dims {others}"
    )


def _slice_static(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    dynamic = [i for i in node.input[1:] if i and info.const(i) is None]
    return Failure("SLICE_NOT_STATIC", f"inputs {dynamic} are not constants") if dynamic else None


def _slice_steps(node: onnx.NodeProto, info: GraphInfo) -> Sequence[int] | None:
    steps = info.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    return None if steps is None else [int(s) for s in steps.ravel()]


def _resize_factors(node: onnx.NodeProto, info: GraphInfo) -> list[float] | None:
    """Per-axis scale factors from constant `scales`, or from constant `sizes` and the static input shape."""
    scales_at = 1 if node.op_type == "Upsample" or len(node.input) == 2 else 2
    scales = info.const(node.input[scales_at]) if len(node.input) > scales_at and node.input[scales_at] else None
    if scales is not None and scales.size:
        return [float(s) for s in scales.ravel()]
    sizes = info.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    shape = info.shape(node.input[0])
    if sizes is None or shape is None or None in shape:
        return None
    return [float(o) / i for o, i in zip(sizes.ravel(), shape, strict=True)]


def _resize_mode(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    mode, ctm = attr(node, "mode", "nearest"), attr(node, "coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear"):
        return Failure("RESIZE_MODE", f"mode {mode}; DLA resizes with nearest or linear only")
    if ctm == "align_corners":
        return Failure("RESIZE_ALIGN_CORNERS", "coordinate_transformation_mode=align_corners")
    return None


def _resize_scales(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    factors = _resize_factors(node, info)
    if factors is None:
        shape = info.shape(node.input[0])
        if shape is None or None in shape:
            return None  # the general static-shape rule reports it
        return Failure("RESIZE_NOT_STATIC", "scales/sizes are not constants")
    if any(abs(f - 1.0) > 1e-6 for f in factors[:-2]):
        return Failure("RESIZE_NC_SCALE", f"scales {factors} resize N or C")
    if any(f < 1 or abs(f - round(f)) > 1e-6 for f in factors[-2:]):
        return Failure("RESIZE_SCALE_NOT_INT", f"spatial scales {factors[-2:]} are not integers >= 1")
    hi = 32 if attr(node, "mode", "nearest") == "nearest" else 4
    if max(factors[-2:]) > hi:
        return Failure(f"RESIZE_SCALE_GT_{hi}", f"spatial scales {factors[-2:]} above {hi}")
    return None


CONV_RULES: tuple[Rule, ...] = (
    _spatial_2d("CONV_3D"),
    _const_input(1, "CONV_NONCONST_WEIGHT"),
    _limit("CONV_KERNEL_GT_32", "kernel", _kernel, 1, 32),
    _limit("CONV_STRIDE_GT_8", "stride", _strides, 1, 8),
    _limit("CONV_DILATION_GT_32", "dilation", _dilations, 1, 32),
    _conv_pads,
    # The group limits ([1, 8192]; [1, 4] for dla_hwc4 inputs) need no rule of their own: groups divide C_out <= 8192,
    # and dla_hwc4 is used for inputs with C in {1, 3, 4} only.
    _limit("CONV_COUT_GT_8192", "output channels", _conv_cout, 1, MAX_DIM),
)
DECONV_RULES: tuple[Rule, ...] = (
    _spatial_2d("DECONV_3D"),
    _const_input(1, "DECONV_NONCONST_WEIGHT"),
    _deconv_kernel,
    _limit("DECONV_STRIDE_GT_32", "stride", _strides, 1, 32),
    _deconv_square,
    _limit("DECONV_DILATION_NE_1", "dilation", _dilations, 1, 1),
    _limit("DECONV_PADS_NONZERO", "pads/output_padding", _deconv_pads, 0, 0),
    _limit("DECONV_GROUP_NE_1", "group", _group, 1, 1),
)
POOL_RULES: tuple[Rule, ...] = (
    _spatial_2d("POOL_3D"),
    _limit("POOL_WINDOW_GT_8", "window", _pool_window, 1, 8),
    _limit("POOL_STRIDE_GT_16", "stride", _strides, 1, 16),
    _limit("POOL_PAD_GT_7", "pads", _pads, 0, 7),
    _same_int8_range("POOL_INT8_RANGES_DIFFER"),
)
# No equal-range rule for INT8 elementwise: no NVIDIA document states one (DOMAIN.md section 7, corrected).
ELTWISE_RULES: tuple[Rule, ...] = (_eltwise_broadcast,)
RESIZE_RULES: tuple[Rule, ...] = (_resize_mode, _resize_scales)
SLICE_RULES: tuple[Rule, ...] = (
    _slice_static,
    _limit("SLICE_STEP_NE_1", "steps", _slice_steps, 1, 1),
    _fp16_only("SLICE_INT8"),
)

# Op types the DLA can run, with the limits each must meet (the general rules below apply to all of them).
OP_RULES: dict[str, tuple[Rule, ...]] = {
    "Conv": CONV_RULES,
    "ConvTranspose": DECONV_RULES,
    "Gemm": (_const_input(1, "GEMM_NONCONST_B"),),
    "MatMul": (_const_input(1, "GEMM_NONCONST_B"),),
    "MaxPool": POOL_RULES,
    "AveragePool": POOL_RULES,
    "BatchNormalization": (),
    **dict.fromkeys(("Relu", "Sigmoid", "Tanh", "LeakyRelu"), ()),
    "Clip": (_clipped_relu,),
    **dict.fromkeys(("Add", "Sub", "Mul", "Max", "Min"), ELTWISE_RULES),
    "Div": (*ELTWISE_RULES, _const_operands("DIV_CONST_OPERANDS", (0, 1))),
    "Pow": (*ELTWISE_RULES, _const_operands("POW_CONST_OPERANDS", (1,))),
    "Concat": (_concat_on_c, _same_int8_range("CONCAT_INT8_RANGES_DIFFER")),
    "Resize": RESIZE_RULES,
    "Upsample": RESIZE_RULES,
    "Slice": SLICE_RULES,
    "Split": (_fp16_only("SLICE_INT8"),),
    "Softmax": (_fp16_only("SOFTMAX_INT8"), _softmax_axis, _softmax_axis_length),
    **dict.fromkeys(("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"), ()),
}
# Op types the DLA runs only from a TensorRT release on; older targets report them as GPU-only.
OP_SINCE: dict[str, TrtVersion] = {"Div": (8, 6, 12), "Pow": (8, 6, 12)}
# ONNX defines Gemm on 2D tensors; TensorRT lowers Gemm with a constant B to a fully connected layer, so the rank rule
# does not apply to it (a MatMul on activations of another rank still needs GPU shuffles).
RANK_EXEMPT = frozenset({"Gemm"})


# --------------------------------------------------------------------------------------------------- general rules
def _io(node: onnx.NodeProto, info: GraphInfo) -> list[str]:
    return [*info.data_inputs(node), *(o for o in node.output if o)]


def _static_shapes(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    for name in _io(node, info):
        shape = info.shape(name)
        if shape is None or None in shape:
            what = "unknown shape" if shape is None else f"shape {['?' if d is None else d for d in shape]}"
            return Failure("DYNAMIC_SHAPE", f"'{name}' has {what}")
    return None


def _float_tensors(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    for name in _io(node, info):
        elem = info.elem_types.get(name) or info.elem_types.get(info.source(name))
        if elem and elem not in FLOAT_TYPES:
            return Failure("NON_FLOAT_TENSOR", f"'{name}' is {TensorProto.DataType.Name(elem)}; DLA is FP16/INT8 only")
    return None


def _rank_4(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    """DLA layers work on N,C,H,W: a rank-3 or rank-5/6 tensor (attention reshapes, windows) needs GPU shuffles."""
    if node.op_type in RANK_EXEMPT:
        return None
    for name in _io(node, info):
        if len(info.shape(name)) != 4:
            return Failure("RANK_NOT_4", f"'{name}' has rank {len(info.shape(name))}, DLA layers take N,C,H,W")
    return None


def _dims_le_8192(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    for name in _io(node, info):
        shape = info.shape(name)
        if max(as_nchw(shape)[-3:]) > MAX_DIM:
            return Failure("DIM_GT_8192", f"'{name}' shape {list(shape)}: C, H, W must be <= {MAX_DIM}")
    return None


def _batch_le_4096(node: onnx.NodeProto, info: GraphInfo, precision: str) -> Failure | None:
    for name in _io(node, info):
        batch = info.batch(name)
        if batch is not None and batch > MAX_BATCH:
            return Failure("BATCH_GT_4096", f"'{name}' has DLA batch {batch} (product of dims before C, H, W)")
    return None


# Checked before the op rules, so integer shape arithmetic is not judged by float-layer limits.
PRE_RULES: tuple[Rule, ...] = (_float_tensors,)
# Checked after them; order matters: the later rules assume static shapes.
GENERAL_RULES: tuple[Rule, ...] = (_static_shapes, _rank_4, _dims_le_8192, _batch_le_4096)

# ---------------------------------------------------------------------------------------------------- suggestions
_NORM_TO_BN = "BatchNormalization (folds into the preceding Conv); fine-tune with BN instead of this normalisation"
GPU_ONLY_SUGGESTIONS: dict[str, str] = {
    "GroupNormalization": _NORM_TO_BN,
    "InstanceNormalization": _NORM_TO_BN,
    "LayerNormalization": _NORM_TO_BN,
    "Pad": "fold the padding into the next Conv's pads (pad < kernel, <= 31)",
    "Expand": "drop it and let the elementwise op broadcast (N,C,1,1 or N,1,1,1 operands)",
    "Where": "multiply by a constant 0/1 mask (Mul runs on the DLA)",
    "Div": "multiply by the reciprocal when the divisor is constant",
    "Erf": "Erf comes from exact GELU: use Relu, or x*Sigmoid(1.702x) (Mul and Sigmoid run on the DLA)",
    "Gelu": "use Relu, or x*Sigmoid(1.702x) (Mul and Sigmoid run on the DLA)",
    "HardSwish": "x*Clip(x+3, 0, 6)*(1/6): Add, Clip and Mul run on the DLA",
    "HardSigmoid": "Clip(x*(1/6)+0.5, 0, 1): Mul, Add and Clip run on the DLA",
    "Mish": "use Relu or LeakyRelu",
    "Cast": "keep tensors float; constant-fold the cast (onnxsim)",
    "Shape": "export with static shapes and constant-fold shape arithmetic (onnxsim)",
    "Gather": "a constant-index Gather along C/H/W is a static Slice; otherwise keep it on the GPU at a part boundary",
}
_KEEP_ON_GPU = "GPU only: keep it at a segment boundary so it adds no DLA<->GPU transition"

SUGGESTIONS: dict[str, str] = {
    "CONV_3D": "fold depth into channels or batch and use a 2D Conv",
    "CONV_NONCONST_WEIGHT": "make the weights initializers (constant-fold with onnxsim)",
    "CONV_KERNEL_GT_32": "factor the kernel into a stack of convs with kernels <= 32",
    "CONV_STRIDE_GT_8": "use stride <= 8 and reach the total stride with a following pool",
    "CONV_DILATION_GT_32": "use dilation <= 32",
    "CONV_PAD_GE_KERNEL": "keep pads < kernel; apply the extra border earlier or crop after",
    "CONV_COUT_GT_8192": "split the output channels over two convs and Concat them on C",
    "DECONV_3D": "fold depth into channels or batch and use a 2D ConvTranspose",
    "DECONV_NONCONST_WEIGHT": "make the weights initializers (constant-fold with onnxsim)",
    "DECONV_KERNEL_GT_32": "Resize(nearest, integer scale) followed by a Conv",
    "DECONV_STRIDE_GT_32": "Resize(nearest, integer scale) followed by a Conv",
    "DECONV_SQUARE_23_32": "use a kernel/stride <= 22 or a non-square one, or Resize(nearest) followed by a Conv",
    "DECONV_DILATION_NE_1": "use dilation 1 (a dilated deconvolution is a Resize plus a dilated Conv)",
    "DECONV_PADS_NONZERO": "export with padding=0, output_padding=0 and crop with a static Slice (FP16) after",
    "DECONV_GROUP_NE_1": "use group=1, or Resize(nearest) followed by a grouped Conv",
    "GEMM_NONCONST_B": "activation x activation products (attention) stay on the GPU; keep them at a part boundary",
    "POOL_3D": "pool in 2D over H, W",
    "POOL_WINDOW_GT_8": "stack pools with windows <= 8 (e.g. 16 = 8 then 2)",
    "POOL_STRIDE_GT_16": "stack pools with strides <= 16",
    "POOL_PAD_GT_7": "keep pool pads <= 7",
    "POOL_INT8_RANGES_DIFFER": "give the pool output its input's scale (no quantizer of its own), or keep it in FP16",
    "ELTWISE_BROADCAST": "give the operand shape N,C,H,W, N,C,1,1 or N,1,1,1",
    "DIV_CONST_OPERANDS": "constant-fold a Div of two constants (onnxsim)",
    "POW_CONST_OPERANDS": "make the exponent (or the base) a build-time constant; x*x for a square",
    "CLIP_NOT_RELU": "clip with constant min 0 (a clipped ReLU), or Relu then Min/Max with constants",
    "CLIP_MAX_RANGE": "use a clipped-ReLU max in [1, 127], or rescale the input so it is",
    "CONCAT_NOT_ON_C": "concatenate on C (transpose so the joined axis is C, or concat before the reshape)",
    "CONCAT_INT8_RANGES_DIFFER": "share one quantizer for every Concat input and its output (as CUDA-BEVFusion does), "
    "or keep the Concat in FP16",
    "RESIZE_MODE": "use mode nearest or linear",
    "RESIZE_ALIGN_CORNERS": "export with align_corners=False",
    "RESIZE_NOT_STATIC": "export with constant scales (static shapes, onnxsim)",
    "RESIZE_NC_SCALE": "resize H and W only",
    "RESIZE_SCALE_NOT_INT": "use integer upsampling factors; downsample with a strided Conv or pool",
    "RESIZE_SCALE_GT_32": "stage the upsampling (e.g. 64 = 8 then 8)",
    "RESIZE_SCALE_GT_4": "stage the linear upsampling (e.g. 8 = 4 then 2) or use nearest",
    "SLICE_NOT_STATIC": "export with static shapes so starts/ends are constants (onnxsim)",
    "SLICE_STEP_NE_1": "use step 1 (a stride-2 pick is a 1x1 Conv with stride 2)",
    "SLICE_INT8": "keep this layer in FP16 (add it to --layerPrecisions ...:fp16)",
    "SOFTMAX_INT8": "keep this layer in FP16 (add it to --layerPrecisions ...:fp16)",
    "SOFTMAX_AXIS": "softmax over C, H or W",
    "SOFTMAX_AXIS_GT_1024": "reshape so the other C/H/W dims are 1 (the accurate mode), or split the axis",
    "DYNAMIC_SHAPE": "export with static shapes (onnxsim --overwrite-input-shape)",
    "NON_FLOAT_TENSOR": "constant-fold shape arithmetic (onnxsim) so no integer tensors remain",
    "RANK_NOT_4": "keep tensors N,C,H,W: [N, C] as [N, C, 1, 1] with a 1x1 Conv instead of Linear; fold extra "
    "leading dims (windows, heads) into N",
    "DIM_GT_8192": "split the tensor so C, H and W stay <= 8192",
    "BATCH_GT_4096": "split the batch into chunks of <= 4096",
    "PLUGIN_OP": "plugins run on the GPU; put them at part boundaries",
}


# --------------------------------------------------------------------------------------------------------- citations
@dataclass(frozen=True)
class Citation:
    """Where a rule is stated and the TensorRT releases it holds for (Orin DLA: 8.5-10.7, then 11.4.1+ on JetPack
    7.2.2+; TensorRT 11.0-11.4.0 have no DLA on Jetson)."""

    section: str
    versions: str

    def __str__(self) -> str:
        return f"{self.section} [{self.versions}]"


_GUIDE = "TensorRT Developer Guide, Working with DLA > DLA Supported Layers and Restrictions"
_LAYER = f"{_GUIDE} > Layer Support and Restrictions"
_GENERAL = Citation(f"{_GUIDE} > General Restrictions", "TensorRT 8.5-10.7, 11.4.1+")
_DLA_SW = "NVIDIA/Deep-Learning-Accelerator-SW operators/README.md (ONNX operator support on Orin DLA)"
_OPS_ELTWISE = "TensorRT Operators reference (10.3), ElementWise > DLA Support"
_DOMAIN = "no NVIDIA guide sentence found; DOMAIN.md section 7 (from NvInfer.h)"
_V = "TensorRT 8.5-10.7"


def _layer(section: str, versions: str = _V) -> Citation:
    return Citation(f"{_LAYER} > {section}", versions)


_CONV, _DECONV, _POOL = (
    _layer("Convolution and Fully Connected Layers"),
    _layer("Deconvolution Layer"),
    _layer("Pooling Layer"),
)
_CONCAT, _RESIZE, _SLICE = _layer("Concatenation Layer"), _layer("Resize Layer"), _layer("Slice Layer")
_SOFTMAX = _layer("SoftMax Layer (Orin only)")
_ELTWISE = _layer("ElementWise Layer")
CITATIONS: dict[str, Citation] = {
    "CONV_3D": _CONV,
    "CONV_NONCONST_WEIGHT": Citation(f"{_DLA_SW} says it of MatMul / Gemm only; for Conv {_DOMAIN}", _V),
    "CONV_KERNEL_GT_32": _CONV,
    "CONV_STRIDE_GT_8": _CONV,
    "CONV_DILATION_GT_32": _CONV,
    "CONV_PAD_GE_KERNEL": _CONV,
    "CONV_COUT_GT_8192": _CONV,
    "DECONV_3D": _DECONV,
    "DECONV_NONCONST_WEIGHT": Citation(_DOMAIN, _V),
    "DECONV_KERNEL_GT_32": _DECONV,
    "DECONV_STRIDE_GT_32": Citation(_DOMAIN, _V),
    "DECONV_SQUARE_23_32": _DECONV,
    "DECONV_DILATION_NE_1": _DECONV,
    "DECONV_PADS_NONZERO": _DECONV,
    "DECONV_GROUP_NE_1": _DECONV,
    "GEMM_NONCONST_B": Citation(f"{_DLA_SW}, MatMul / Gemm: the second input must be a constant", _V),
    "POOL_3D": _POOL,
    "POOL_WINDOW_GT_8": _POOL,
    "POOL_STRIDE_GT_16": _POOL,
    "POOL_PAD_GT_7": _POOL,
    "POOL_INT8_RANGES_DIFFER": _POOL,
    "ELTWISE_BROADCAST": Citation(f"{_ELTWISE}; {_OPS_ELTWISE} (NCHW, NC11, N111)", _V),
    "DIV_CONST_OPERANDS": Citation(_OPS_ELTWISE, "TensorRT 8.6.12-10.7, 11.4.1+"),
    "POW_CONST_OPERANDS": Citation(_OPS_ELTWISE, "TensorRT 8.6.12-10.7, 11.4.1+"),
    "CLIP_NOT_RELU": _layer("Activation Layer (clipped ReLU)"),
    "CLIP_MAX_RANGE": _layer("Activation Layer (clipped ReLU)"),
    "CONCAT_NOT_ON_C": _CONCAT,
    "CONCAT_INT8_RANGES_DIFFER": _CONCAT,
    "RESIZE_MODE": _RESIZE,
    "RESIZE_ALIGN_CORNERS": Citation(_DOMAIN, _V),
    "RESIZE_NOT_STATIC": _RESIZE,
    "RESIZE_NC_SCALE": _RESIZE,
    "RESIZE_SCALE_NOT_INT": _RESIZE,
    "RESIZE_SCALE_GT_32": _RESIZE,
    "RESIZE_SCALE_GT_4": _RESIZE,
    "SLICE_NOT_STATIC": _SLICE,
    "SLICE_STEP_NE_1": Citation(_DOMAIN, _V),
    "SLICE_INT8": _SLICE,
    "SOFTMAX_INT8": _SOFTMAX,
    "SOFTMAX_AXIS": _SOFTMAX,
    "SOFTMAX_AXIS_GT_1024": _SOFTMAX,
    "DYNAMIC_SHAPE": _GENERAL,
    "NON_FLOAT_TENSOR": Citation(
        "TensorRT Developer Guide, Working with DLA > Running on DLA during TensorRT Inference (FP16 and INT8 only)",
        "TensorRT 8.5-10.7, 11.4.1+",
    ),
    "RANK_NOT_4": _layer(
        "each layer: '2D only' / 'only two spatial dimensions'; Slice and Shuffle: 4-D inputs "
        "only (the General Restrictions' NPQRS batch note is not taken as allowing rank 5)"
    ),
    "DIM_GT_8192": _GENERAL,
    "BATCH_GT_4096": _GENERAL,
    "UNSUPPORTED_OP": Citation(f"{_LAYER} (layers not listed run on the GPU); {_DLA_SW}", _V),
    "PLUGIN_OP": Citation(f"{_LAYER} (plugin layers are not listed)", _V),
}
OP_SINCE_SOURCE = Citation(
    f"{_DLA_SW}: Div / Pow 'Native (as of TensorRT 8.6.12)', 'None' in its TensorRT 8.5 edition; {_OPS_ELTWISE}",
    "unsupported before TensorRT 8.6.12 (JetPack 5.1 = 8.5.2), supported on 10.x",
)


def pool_stages(size: int, cap: int = 8) -> list[int] | None:
    """Factor a spatial size into pooling windows <= cap (32 -> [8, 4]); None if a prime factor above cap forbids it."""
    stages = []
    while size > 1:
        factor = next((k for k in range(cap, 1, -1) if size % k == 0), None)
        if factor is None:
            return None
        stages.append(factor)
        size //= factor
    return stages or [1]


def _pool_suggestion(node: onnx.NodeProto, info: GraphInfo, pool: str) -> str:
    shape = info.shape(node.input[0])
    if not shape or len(shape) != 4 or None in shape[2:]:
        return f"{pool} over H, W with windows <= 8 (static shapes needed to size it)"
    hs, ws = pool_stages(shape[2]), pool_stages(shape[3])
    if hs is None or ws is None:
        return f"{pool} cannot tile {shape[2]}x{shape[3]} with windows <= 8: resize to a size with factors <= 8"
    n = max(len(hs), len(ws))
    hs, ws = hs + [1] * (n - len(hs)), ws + [1] * (n - len(ws))
    chain = " then ".join(f"kernel=stride=[{h}, {w}]" for h, w in zip(hs, ws, strict=True))
    return f"{pool}({chain})"


def _reduce_suggestion(node: onnx.NodeProto, info: GraphInfo) -> str:
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and info.const(node.input[1]) is not None:
        axes = info.const(node.input[1]).tolist()
    rank = len(info.shape(node.input[0]) or ())
    if node.op_type in ("ReduceMean", "ReduceMax") and rank == 4 and sorted(a % 4 for a in axes or ()) == [2, 3]:
        return _pool_suggestion(node, info, "AveragePool" if node.op_type == "ReduceMean" else "MaxPool")
    return _KEEP_ON_GPU


def _unsupported(
    node: onnx.NodeProto, info: GraphInfo, detail: str = "", source: Citation | None = None
) -> NodeVerdict:
    op = node.op_type
    if op == "GlobalAveragePool":
        suggestion = _pool_suggestion(node, info, "AveragePool")
    elif op == "GlobalMaxPool":
        suggestion = _pool_suggestion(node, info, "MaxPool")
    elif op.startswith("Reduce"):
        suggestion = _reduce_suggestion(node, info)
    else:
        suggestion = GPU_ONLY_SUGGESTIONS.get(op, _KEEP_ON_GPU)
    detail = detail or f"{op} has no DLA implementation"
    source = source or CITATIONS["UNSUPPORTED_OP"]
    return NodeVerdict(layer_name(node), op, False, f"UNSUPPORTED_OP:{op}", detail, suggestion, str(source))


# ------------------------------------------------------------------------------------------------------ public API
def check_node(node: onnx.NodeProto, graph_info: GraphInfo, precision: str = "int8") -> NodeVerdict:
    """Can this layer run on an Orin DLA at `precision`? The first failing rule gives the reason."""
    name, op = layer_name(node), node.op_type
    if node.domain not in ("", "ai.onnx"):
        detail, source = f"custom op of domain {node.domain}", str(CITATIONS["PLUGIN_OP"])
        return NodeVerdict(name, op, False, f"PLUGIN_OP:{op}", detail, SUGGESTIONS["PLUGIN_OP"], source)
    if op not in OP_RULES:
        return _unsupported(node, graph_info)
    since = OP_SINCE.get(op, (0, 0, 0))
    if graph_info.trt_version < since:
        detail = f"TensorRT {version_text(graph_info.trt_version)} has no DLA {op} (from {version_text(since)} on)"
        return _unsupported(node, graph_info, detail, OP_SINCE_SOURCE)
    for rule in (*PRE_RULES, *OP_RULES[op], *GENERAL_RULES):
        failure = rule(node, graph_info, precision)
        if failure is not None:
            suggestion = failure.suggestion or SUGGESTIONS.get(failure.code)
            source = str(CITATIONS[failure.code.split(":")[0]])
            return NodeVerdict(name, op, False, failure.code, failure.detail, suggestion, source)
    return NodeVerdict(name, op, True, "OK")


def check_model(
    model: onnx.ModelProto,
    precision: str = "int8",
    fp16_layers: Iterable[str] = (),
    scales: dict[str, float] | None = None,
    trt_version: str = DEFAULT_TRT_VERSION,
) -> list[NodeVerdict]:
    """Verdicts for every layer in graph order; `fp16_layers` are checked at FP16, `scales` add cache scales, and
    version-dependent rules follow `trt_version` (the bundle's TensorRT target, or its calibration-cache tag)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (the DLA runs FP16/INT8 only), got {precision!r}")
    info, fp16 = graph_info(model, scales, trt_version), set(fp16_layers)
    layers = [n for n in model.graph.node if is_layer(n)]
    return [check_node(n, info, "fp16" if n.name in fp16 else precision) for n in layers]
