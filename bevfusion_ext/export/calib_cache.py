"""The DLA's INT8 path: turn a QAT Q/DQ ONNX into a Q/DQ-free ONNX plus a TensorRT calibration cache and an FP16 list.

The DLA takes implicit quantization only, so the scales the QAT model learned travel in a calibration cache that
`trtexec --calib` reads instead of calibrating: first line `TRT-<version>-EntropyCalibration2`, then one
`<tensor>: <8 hex digits of the big-endian float32 scale>` per tensor, scale = amax / 127. Tensor names are the ONNX
names of the stripped model, which keeps each quantized tensor's original (pre-Q/DQ) name.
"""

from __future__ import annotations

import copy
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .dla_rules import FLOAT_TYPES, GraphInfo, attr, graph_info, is_layer, layer_name, parse_trt_version

DEFAULT_TAG = "TRT-8601-EntropyCalibration2"
FLOAT = onnx.TensorProto.FLOAT
# Ops whose output range lies inside their input range: a scale may flow downstream through them (pooling: the DLA
# wants the INT8 input range equal to the output range anyway).
SCALE_DOWNSTREAM_OPS = frozenset(
    {"Relu", "MaxPool", "AveragePool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
)
# ... and upstream only where that changes nothing (a Relu input clipped at -amax still becomes 0; a Concat input lies
# inside the output range, and the DLA wants every INT8 Concat input on the output's range).
SCALE_UPSTREAM_OPS = frozenset({"Relu", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat"})
# TensorRT folds a BatchNormalization into the Conv before it, so it needs no input scale of its own.
FOLDED_INTO_PRODUCER = {"BatchNormalization": frozenset({"Conv", "ConvTranspose"})}


def calib_tag(trt_version: str) -> str:
    """The cache header TensorRT `trt_version` writes ("8.6.1" -> TRT-8601-..., "10.3.0" -> TRT-100300-...)."""
    major, minor, patch = parse_trt_version(trt_version)
    number = major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch
    return f"TRT-{number}-EntropyCalibration2"


def scales_from_qdq(model: onnx.ModelProto) -> dict[str, float]:
    """Per-tensor activation scales (amax/127) of a Q/DQ model, keyed by the float tensor each quantizer reads."""
    return graph_info(model).scales


def write_calib_cache(scales: dict[str, float], path: str | os.PathLike, trt_version_tag: str = DEFAULT_TAG) -> None:
    """Write `scales` in TensorRT's calibration-cache text format (exact float32 bits, big-endian hex)."""
    bad = [name for name in scales if not name or "\n" in name]
    if bad:
        raise ValueError(f"tensor names {bad!r} cannot be written to a calibration cache")
    lines = [trt_version_tag, *(f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in scales.items())]
    Path(path).write_text("\n".join(lines) + "\n")


def read_calib_cache(path: str | os.PathLike) -> dict[str, float]:
    """Parse a TensorRT calibration cache back into {tensor: float32 scale}."""
    header, *lines = Path(path).read_text().splitlines()
    if not header.startswith("TRT-"):
        raise ValueError(f"{path}: first line {header!r} is not a TensorRT calibration cache header")
    scales = {}
    for line in filter(None, lines):
        name, _, value = line.rpartition(":")
        scales[name] = struct.unpack(">f", bytes.fromhex(value.strip().rjust(8, "0")))[0]
    return scales


def _range_inputs(node: onnx.NodeProto, info: GraphInfo) -> list[str]:
    """The inputs whose range a scale-propagating op carries: every Concat input, else the first input."""
    return info.data_inputs(node) if node.op_type == "Concat" else [info.source(node.input[0])]


def propagate_scales(model: onnx.ModelProto, scales: dict[str, float]) -> dict[str, float]:
    """Fill missing scales across range-preserving ops so TensorRT can keep their neighbours fused in INT8.

    Downstream through SCALE_DOWNSTREAM_OPS (and a Concat whose inputs share one scale), then upstream through
    SCALE_UPSTREAM_OPS into inputs nothing else reads: a Concat's unscaled inputs (e.g. the fuser's `camera_bev` and
    `lidar_bev`, quantized only after the concat) get its output scale, which the INT8 DLA Concat requires anyway.
    """
    info, out = graph_info(model), dict(scales)
    layers = [n for n in model.graph.node if is_layer(n)]
    for node in (n for n in layers if n.op_type in SCALE_DOWNSTREAM_OPS | {"Concat"}):
        known = {out.get(src) for src in _range_inputs(node, info)}
        if len(known) == 1 and None not in known and node.output[0] not in out:
            out[node.output[0]] = known.pop()
    for node in (n for n in reversed(layers) if n.op_type in SCALE_UPSTREAM_OPS and n.output[0] in out):
        for src in _range_inputs(node, info):
            if src not in out and len(info.consumers.get(src, [])) == 1:
                out[src] = out[node.output[0]]
    return out


def _along(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """Reshape per-channel quantization parameters to broadcast along `axis` of a rank-`rank` tensor."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis] = values.size
    return values.reshape(shape)


def _fake_quant_weight(dq: onnx.NodeProto, q: onnx.NodeProto | None, info: GraphInfo) -> np.ndarray:
    """The float weight DQ(Q(w)) computes, bit for bit as ONNX defines it (round half to even, saturate)."""
    if q is None:
        w_q = info.consts[info.source(dq.input[0])]
    else:
        w = info.consts[info.source(q.input[0])].astype(np.float32)
        zero = info.const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.int8)
        axis = attr(q, "axis", 1) % w.ndim
        scale, zero_b = _along(info.const(q.input[1]), axis, w.ndim), _along(zero, axis, w.ndim)
        bounds = np.iinfo(zero.dtype)
        w_q = np.clip(np.rint(w / scale) + zero_b, bounds.min, bounds.max).astype(zero.dtype)
    axis = attr(dq, "axis", 1) % w_q.ndim
    zero = info.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), w_q.dtype)
    scale = _along(info.const(dq.input[1]), axis, w_q.ndim)
    diff = w_q.astype(np.int32) - _along(zero, axis, w_q.ndim).astype(np.int32)
    return (diff.astype(np.float32) * scale).astype(np.float32)


def _fold_or_bypass(dq: onnx.NodeProto, info: GraphInfo, new_weights: dict[str, np.ndarray]) -> str:
    """The tensor DQ's readers should read instead: the quantized activation, or a new fake-quantized initializer."""
    producer = info.producers.get(dq.input[0])
    q = producer if producer is not None and producer.op_type == "QuantizeLinear" else None
    base = q.input[0] if q is not None else dq.input[0]
    if info.const(base) is None:
        return info.source(base)  # the name the cache keys its scale by
    sole_reader = q is not None and all(r is q for r in info.consumers.get(base, []))
    name = base if sole_reader and base not in info.producers else dq.output[0]
    new_weights[name] = _fake_quant_weight(dq, q, info)
    return name


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers, Constant nodes and value_info nothing reads any more."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    live = used | {o for n in graph.node for o in n.output}
    infos = [vi for vi in graph.value_info if vi.name in live]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _feeds_only_dq(q: onnx.NodeProto, info: GraphInfo) -> bool:
    return all(r.op_type == "DequantizeLinear" for r in info.consumers.get(q.output[0], []))


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove every Q/DQ pair: activations read the original float tensor again, weights become fake-quantized."""
    info = graph_info(model)
    out = copy.deepcopy(model)
    g = out.graph
    stray = [layer_name(n) for n in g.node if n.op_type == "QuantizeLinear" and not _feeds_only_dq(n, info)]
    if stray:
        raise ValueError(f"QuantizeLinear nodes {stray} feed something other than a DequantizeLinear")
    new_weights: dict[str, np.ndarray] = {}
    rename = {dq.output[0]: _fold_or_bypass(dq, info, new_weights) for dq in g.node if dq.op_type == "DequantizeLinear"}
    keep = [n for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
    for o in g.output:
        o.name = rename.get(o.name, o.name)
    del g.node[:]
    g.node.extend(keep)
    replaced = [i for i in g.initializer if i.name not in new_weights]
    del g.initializer[:]
    g.initializer.extend([*replaced, *(numpy_helper.from_array(w, name) for name, w in new_weights.items())])
    _drop_unused(g)
    onnx.checker.check_model(out)
    return out


def _folded(node: onnx.NodeProto, info: GraphInfo) -> bool:
    producer = info.producers.get(node.input[0])
    return producer is not None and producer.op_type in FOLDED_INTO_PRODUCER.get(node.op_type, ())


def fp16_layers(model: onnx.ModelProto, scales: dict[str, float], sensitive: Iterable[str] = ()) -> list[str]:
    """Layers to pin to FP16 (`--layerPrecisions`): those reading a tensor without a scale, plus `sensitive` ones."""
    info = graph_info(model)
    layers = [n for n in model.graph.node if is_layer(n)]
    names = [layer_name(n) for n in layers]
    unknown = sorted(set(sensitive) - set(names))
    if unknown:
        raise ValueError(f"sensitive layers {unknown} are not in the model (names are ONNX node names)")
    unscaled = [
        layer_name(n)
        for n in layers
        if not _folded(n, info)
        and any(t not in scales and info.elem_types.get(t, FLOAT) in FLOAT_TYPES for t in info.data_inputs(n))
    ]
    wanted = set(unscaled) | set(sensitive)
    return [name for name in names if name in wanted]
