"""Graph-level export tooling for the Orin: DLA rule check and placement, the DLA INT8 path (Q/DQ strip + calibration
cache + FP16 list), trtexec commands and scripts, the TensorRT Python build, and a roofline latency projection.

Everything here works on `onnx.ModelProto`s and files only; it knows nothing about BEVFusion.
"""

from .calib_cache import (
    calib_tag,
    fp16_layers,
    propagate_scales,
    read_calib_cache,
    scales_from_qdq,
    strip_qdq,
    write_calib_cache,
)
from .dla_rules import GENERAL_RULES, OP_RULES, GraphInfo, NodeVerdict, check_model, check_node, graph_info
from .partition import Plan, Segment, partition
from .roofline import PEAKS, LayerCost, layer_costs, roofline
from .tensorrt_build import TensorRTUnavailable, build_engine, tensorrt_available
from .trtexec import commands, dla_io_format, io_formats_from_onnx, write_build_scripts

__all__ = [
    "GENERAL_RULES",
    "OP_RULES",
    "PEAKS",
    "GraphInfo",
    "LayerCost",
    "NodeVerdict",
    "Plan",
    "Segment",
    "TensorRTUnavailable",
    "build_engine",
    "calib_tag",
    "check_model",
    "check_node",
    "commands",
    "dla_io_format",
    "fp16_layers",
    "graph_info",
    "io_formats_from_onnx",
    "layer_costs",
    "partition",
    "propagate_scales",
    "read_calib_cache",
    "roofline",
    "scales_from_qdq",
    "strip_qdq",
    "tensorrt_available",
    "write_build_scripts",
    "write_calib_cache",
]
