"""The Orin DLA checker on small hand-built ONNX graphs: both sides of every limit (each cited from NVIDIA's "DLA
Supported Layers and Restrictions" or noted where no NVIDIA sentence was found), the rules keyed by the TensorRT
target, and the DLA/GPU partition (loadables, transitions) it leads to."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bevfusion_ext.export import check_model, partition
from bevfusion_ext.export.dla_rules import (
    CITATIONS,
    OP_SINCE_SOURCE,
    SUGGESTIONS,
    Citation,
    parse_trt_version,
    pool_stages,
)

F32 = TensorProto.FLOAT


def w(*shape: int) -> np.ndarray:
    return np.full(shape, 0.01, np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def build(nodes, inputs, consts=None, outputs=("y",), opset=17, elem=F32, extra_opsets=()) -> onnx.ModelProto:
    """A model of `nodes` reading graph inputs {name: shape} and constant initializers {name: array}."""
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs],
        [numpy_helper.from_array(v, n) for n, v in (consts or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def one(
    op,
    inputs,
    consts=None,
    names=None,
    precision="int8",
    opset=17,
    elem=F32,
    domain="",
    outs=("y",),
    scales=None,
    trt="10.3",
    **attrs,
):
    """The verdict for a single `op` node reading `names` (default: the graph inputs, then the constants)."""
    consts = consts or {}
    names = names if names is not None else [*inputs, *consts]
    node = helper.make_node(op, names, list(outs), name="n", domain=domain, **attrs)
    extra = [domain] if domain else []
    model = build([node], inputs, consts, outputs=outs, opset=opset, elem=elem, extra_opsets=extra)
    [verdict] = check_model(model, precision, scales=scales, trt_version=trt)
    return verdict


X = {"x": [1, 4, 64, 64]}
X8 = {"x": [1, 4, 8, 8]}


def conv(k=3, cout=4, cin=4, x=None, **attrs):
    return dict(op="Conv", inputs=x or X, consts={"w": w(cout, cin, k, k)}, **attrs)


def deconv(k=2, cout=4, group=1, **attrs):
    return dict(op="ConvTranspose", inputs=X8, consts={"w": w(4, cout // group, k, k)}, group=group, **attrs)


def pool(op="MaxPool", k=2, **attrs):
    return dict(op=op, inputs={"x": [1, 4, 32, 32]}, kernel_shape=[k, k], **attrs)


def resize(scales=None, sizes=None, **attrs):
    consts = {"s": f32(*scales)} if scales else {"z": i64(*sizes)}
    names = ["x", "", "s"] if scales else ["x", "", "", "z"]
    return dict(op="Resize", inputs=X8, consts=consts, names=names, **attrs)


def slice_(steps=1, precision="fp16"):
    consts = {"st": i64(0), "en": i64(2), "ax": i64(1), "sp": i64(steps)}
    return dict(op="Slice", inputs=X8, consts=consts, precision=precision)


CASES = {
    # Conv: kernel 1..32, stride 1..8, pad 0..31 and < kernel, dilation 1..32, Cout <= 8192, 2D, constant weights
    "conv_kernel_32": (conv(k=32), "OK"),
    "conv_kernel_33": (conv(k=33), "CONV_KERNEL_GT_32"),
    "conv_stride_8": (conv(strides=[8, 8]), "OK"),
    "conv_stride_9": (conv(strides=[9, 9]), "CONV_STRIDE_GT_8"),
    "conv_pad_lt_kernel": (conv(pads=[2, 2, 2, 2]), "OK"),
    "conv_pad_eq_kernel": (conv(pads=[0, 0, 3, 3]), "CONV_PAD_GE_KERNEL"),
    "conv_pad_31_kernel_32": (conv(k=32, pads=[31, 31, 31, 31]), "OK"),
    "conv_auto_pad_same": (conv(auto_pad="SAME_UPPER"), "OK"),
    "conv_dilation_32": (conv(x={"x": [1, 4, 128, 128]}, dilations=[32, 32]), "OK"),
    "conv_dilation_33": (conv(x={"x": [1, 4, 128, 128]}, dilations=[33, 33]), "CONV_DILATION_GT_32"),
    "conv_cout_8192": (conv(k=1, cin=1, cout=8192, x={"x": [1, 1, 2, 2]}), "OK"),
    "conv_cout_8193": (conv(k=1, cin=1, cout=8193, x={"x": [1, 1, 2, 2]}), "CONV_COUT_GT_8192"),
    "conv_3d": (dict(op="Conv", inputs={"x": [1, 1, 4, 8, 8]}, consts={"w": w(2, 1, 3, 3, 3)}), "CONV_3D"),
    "conv_weight_activation": (dict(op="Conv", inputs={"x": [1, 4, 8, 8], "v": [4, 4, 3, 3]}), "CONV_NONCONST_WEIGHT"),
    # Conv groups: [1, 8192] follows from C_out <= 8192 (groups divide it)
    "conv_groups_8192": (
        dict(op="Conv", inputs={"x": [1, 8192, 1, 1]}, consts={"w": w(8192, 1, 1, 1)}, group=8192),
        "OK",
    ),
    "conv_groups_8193": (
        dict(op="Conv", inputs={"x": [1, 8193, 1, 1]}, consts={"w": w(8193, 1, 1, 1)}, group=8193),
        "CONV_COUT_GT_8192",
    ),
    # ConvTranspose: kernel 1..32 (or 1x64/96/128), stride 1..32, no square kernel/stride in 23..32, dilation 1, pads 0,
    # group 1
    "deconv_kernel_22": (deconv(k=22), "OK"),
    "deconv_kernel_23": (deconv(k=23), "DECONV_SQUARE_23_32"),
    "deconv_kernel_32": (deconv(k=32), "DECONV_SQUARE_23_32"),
    "deconv_kernel_32x24_not_square": (dict(op="ConvTranspose", inputs=X8, consts={"w": w(4, 4, 32, 24)}), "OK"),
    "deconv_kernel_33": (deconv(k=33), "DECONV_KERNEL_GT_32"),
    "deconv_kernel_1x64": (dict(op="ConvTranspose", inputs=X8, consts={"w": w(4, 4, 1, 64)}), "OK"),
    "deconv_kernel_2x64": (dict(op="ConvTranspose", inputs=X8, consts={"w": w(4, 4, 2, 64)}), "DECONV_KERNEL_GT_32"),
    "deconv_stride_22": (deconv(strides=[22, 22]), "OK"),
    "deconv_stride_24": (deconv(strides=[24, 24]), "DECONV_SQUARE_23_32"),
    "deconv_stride_32x2_not_square": (deconv(strides=[32, 2]), "OK"),
    "deconv_stride_33": (deconv(strides=[33, 33]), "DECONV_STRIDE_GT_32"),
    "deconv_dilation_1": (deconv(dilations=[1, 1]), "OK"),
    "deconv_dilation_2": (deconv(dilations=[2, 2]), "DECONV_DILATION_NE_1"),
    "deconv_pads_0": (deconv(k=3, pads=[0, 0, 0, 0]), "OK"),
    "deconv_pads_1": (deconv(k=3, pads=[1, 1, 1, 1]), "DECONV_PADS_NONZERO"),
    "deconv_output_padding": (deconv(k=3, strides=[2, 2], output_padding=[1, 1]), "DECONV_PADS_NONZERO"),
    "deconv_group_2": (deconv(group=2), "DECONV_GROUP_NE_1"),
    "deconv_3d": (dict(op="ConvTranspose", inputs={"x": [1, 1, 4, 8, 8]}, consts={"w": w(1, 2, 2, 2, 2)}), "DECONV_3D"),
    "deconv_weight_activation": (
        dict(op="ConvTranspose", inputs={"x": [1, 4, 8, 8], "v": [4, 4, 2, 2]}),
        "DECONV_NONCONST_WEIGHT",
    ),
    # Gemm / MatMul: constant second input only
    "gemm_const_b": (dict(op="Gemm", inputs={"x": [2, 8]}, consts={"b": w(8, 4)}), "OK"),
    "gemm_activation_b": (dict(op="Gemm", inputs={"x": [2, 8], "b": [8, 4]}), "GEMM_NONCONST_B"),
    "gemm_m_4096": (dict(op="Gemm", inputs={"x": [4096, 8]}, consts={"b": w(8, 4)}), "OK"),
    "gemm_m_4097_is_batch": (dict(op="Gemm", inputs={"x": [4097, 8]}, consts={"b": w(8, 4)}), "BATCH_GT_4096"),
    "matmul_const_b": (dict(op="MatMul", inputs={"x": [1, 1, 4, 8]}, consts={"b": w(8, 4)}), "OK"),
    "matmul_activation_b": (dict(op="MatMul", inputs={"x": [1, 1, 4, 8], "b": [1, 1, 8, 4]}), "GEMM_NONCONST_B"),
    # Pooling: window 1..8, stride 1..16, pad 0..7, 2D
    "pool_window_8": (pool(k=8), "OK"),
    "pool_window_9": (pool(k=9), "POOL_WINDOW_GT_8"),
    "pool_stride_16": (pool(strides=[16, 16]), "OK"),
    "pool_stride_17": (pool(strides=[17, 17]), "POOL_STRIDE_GT_16"),
    "pool_pad_7": (pool(k=8, pads=[7, 7, 7, 7]), "OK"),
    "pool_pad_8": (pool(k=8, pads=[8, 8, 8, 8]), "POOL_PAD_GT_7"),
    "avgpool_window_9": (pool(op="AveragePool", k=9), "POOL_WINDOW_GT_8"),
    "pool_3d": (dict(op="MaxPool", inputs={"x": [1, 1, 4, 8, 8]}, kernel_shape=[2, 2, 2]), "POOL_3D"),
    # Elementwise: 4D, broadcast as NCHW / NC11 / N111
    "add_4d": (dict(op="Add", inputs={"x": [1, 4, 8, 8], "z": [1, 4, 8, 8]}), "OK"),
    "add_3d": (dict(op="Add", inputs={"x": [4, 8, 8], "z": [4, 8, 8]}), "RANK_NOT_4"),
    "add_5d_window_mask": (dict(op="Add", inputs={"x": [1, 4, 3, 7, 7], "z": [1, 4, 1, 7, 7]}), "RANK_NOT_4"),
    "mul_nc11": (dict(op="Mul", inputs=X8, consts={"c": w(1, 4, 1, 1)}), "OK"),
    "mul_scalar": (dict(op="Mul", inputs=X8, consts={"c": f32(0.5)}), "OK"),
    "mul_along_w": (dict(op="Mul", inputs=X8, consts={"c": w(8)}), "ELTWISE_BROADCAST"),
    # Div: at most one constant operand; Pow: exactly one (TensorRT 10.3 operator reference, ElementWise > DLA Support)
    "div_by_constant": (dict(op="Div", inputs=X8, consts={"c": f32(2.0)}), "OK"),
    "div_two_activations": (dict(op="Div", inputs={"x": [1, 4, 8, 8], "z": [1, 4, 8, 8]}), "OK"),
    "div_two_constants": (
        dict(op="Div", inputs={}, consts={"a": w(1, 4, 8, 8), "c": f32(2.0)}),
        "DIV_CONST_OPERANDS",
    ),
    "pow_constant_exponent": (dict(op="Pow", inputs=X8, consts={"c": f32(2.0)}), "OK"),
    "pow_two_activations": (dict(op="Pow", inputs={"x": [1, 4, 8, 8], "z": [1, 4, 8, 8]}), "POW_CONST_OPERANDS"),
    # Clip: only as a clipped ReLU (min 0, constant max in [1, 127])
    "clip_relu6": (dict(op="Clip", inputs=X8, consts={"lo": f32(0.0), "hi": f32(6.0)}), "OK"),
    "clip_relu6_opset6": (dict(op="Clip", inputs=X8, opset=6, min=0.0, max=6.0), "OK"),
    "clip_max_127": (dict(op="Clip", inputs=X8, consts={"lo": f32(0.0), "hi": f32(127.0)}), "OK"),
    "clip_max_128": (dict(op="Clip", inputs=X8, consts={"lo": f32(0.0), "hi": f32(128.0)}), "CLIP_MAX_RANGE"),
    "clip_max_half": (dict(op="Clip", inputs=X8, consts={"lo": f32(0.0), "hi": f32(0.5)}), "CLIP_MAX_RANGE"),
    "clip_negative_min": (dict(op="Clip", inputs=X8, consts={"lo": f32(-1.0), "hi": f32(1.0)}), "CLIP_NOT_RELU"),
    "clip_no_bounds": (dict(op="Clip", inputs=X8), "CLIP_NOT_RELU"),
    "clip_activation_max": (
        dict(op="Clip", inputs={**X8, "hi": []}, consts={"lo": f32(0.0)}, names=["x", "lo", "hi"]),
        "CLIP_NOT_RELU",
    ),
    # Concat on C only
    "concat_axis_1": (dict(op="Concat", inputs={"x": [1, 4, 8, 8], "z": [1, 2, 8, 8]}, axis=1), "OK"),
    "concat_axis_minus_3": (dict(op="Concat", inputs={"x": [1, 4, 8, 8], "z": [1, 2, 8, 8]}, axis=-3), "OK"),
    "concat_axis_2": (dict(op="Concat", inputs={"x": [1, 4, 8, 8], "z": [1, 4, 2, 8]}, axis=2), "CONCAT_NOT_ON_C"),
    # Resize: integer scales, nearest 1..32, linear 1..4, no align_corners, H/W only, constant
    "resize_nearest_2": (resize([1, 1, 2, 2]), "OK"),
    "resize_nearest_2_5": (resize([1, 1, 2.5, 2.5]), "RESIZE_SCALE_NOT_INT"),
    "resize_downsample": (resize([1, 1, 0.5, 0.5]), "RESIZE_SCALE_NOT_INT"),
    "resize_nearest_32": (resize([1, 1, 32, 32]), "OK"),
    "resize_nearest_33": (resize([1, 1, 33, 33]), "RESIZE_SCALE_GT_32"),
    "resize_linear_4": (resize([1, 1, 4, 4], mode="linear"), "OK"),
    "resize_linear_5": (resize([1, 1, 5, 5], mode="linear"), "RESIZE_SCALE_GT_4"),
    "resize_align_corners": (
        resize([1, 1, 2, 2], mode="linear", coordinate_transformation_mode="align_corners"),
        "RESIZE_ALIGN_CORNERS",
    ),
    "resize_cubic": (resize([1, 1, 2, 2], mode="cubic"), "RESIZE_MODE"),
    "resize_channels": (resize([1, 2, 2, 2]), "RESIZE_NC_SCALE"),
    "resize_sizes": (resize(sizes=[1, 4, 16, 16]), "OK"),
    "resize_scales_activation": (
        dict(op="Resize", inputs={**X8, "s": [4]}, names=["x", "", "s"]),
        "RESIZE_NOT_STATIC",
    ),
    # Slice: FP16, static, step 1
    "slice_fp16": (slice_(), "OK"),
    "slice_int8": (slice_(precision="int8"), "SLICE_INT8"),
    "slice_step_2": (slice_(steps=2), "SLICE_STEP_NE_1"),
    "slice_dynamic_start": (
        dict(op="Slice", inputs={**X8, "st": [1]}, consts={"en": i64(2), "ax": i64(1)}, precision="fp16"),
        "SLICE_NOT_STATIC",
    ),
    # Softmax: FP16 on Orin, over C or spatial axes
    "softmax_fp16_axis_1": (dict(op="Softmax", inputs=X8, axis=1, precision="fp16"), "OK"),
    "softmax_fp16_axis_w": (dict(op="Softmax", inputs=X8, axis=-1, precision="fp16"), "OK"),
    "softmax_int8": (dict(op="Softmax", inputs=X8, axis=1, precision="int8"), "SOFTMAX_INT8"),
    "softmax_batch_axis": (dict(op="Softmax", inputs=X8, axis=0, precision="fp16"), "SOFTMAX_AXIS"),
    # Softmax axis length: <= 1024 when another C/H/W dim is > 1 (optimized mode), else the accurate mode
    "softmax_axis_1024": (dict(op="Softmax", inputs={"x": [1, 1024, 2, 1]}, axis=1, precision="fp16"), "OK"),
    "softmax_axis_1025": (
        dict(op="Softmax", inputs={"x": [1, 1025, 2, 1]}, axis=1, precision="fp16"),
        "SOFTMAX_AXIS_GT_1024",
    ),
    "softmax_axis_4096_accurate_mode": (
        dict(op="Softmax", inputs={"x": [2, 1, 1, 4096]}, axis=-1, precision="fp16"),
        "OK",
    ),
    # General: rank 4 (N,C,H,W), C/H/W <= 8192, batch <= 4096, static shapes, float tensors
    "rank_4": (dict(op="Relu", inputs={"x": [1, 4, 8, 8]}), "OK"),
    "rank_3": (dict(op="Relu", inputs={"x": [1, 4, 8]}), "RANK_NOT_4"),
    "rank_5": (dict(op="Relu", inputs={"x": [1, 2, 4, 8, 8]}), "RANK_NOT_4"),
    "matmul_rank_2": (dict(op="MatMul", inputs={"x": [2, 8]}, consts={"b": w(8, 4)}), "RANK_NOT_4"),
    "transpose_rank_4": (dict(op="Transpose", inputs={"x": [1, 4, 8, 2]}, perm=[0, 1, 3, 2]), "OK"),
    "transpose_rank_5_swin_heads": (
        dict(op="Transpose", inputs={"x": [1, 49, 3, 3, 32]}, perm=[2, 0, 3, 1, 4]),
        "RANK_NOT_4",
    ),
    "reshape_rank_4": (dict(op="Reshape", inputs={"x": [1, 4, 8, 8]}, consts={"s": i64(1, 16, 4, 4)}), "OK"),
    "reshape_rank_6_swin_windows": (
        dict(op="Reshape", inputs={"x": [1, 14, 14, 96]}, consts={"s": i64(1, 2, 7, 2, 7, 96)}),
        "RANK_NOT_4",
    ),
    "dim_8192": (dict(op="Relu", inputs={"x": [1, 1, 1, 8192]}), "OK"),
    "dim_8193": (dict(op="Relu", inputs={"x": [1, 1, 1, 8193]}), "DIM_GT_8192"),
    "batch_4096": (dict(op="Relu", inputs={"x": [4096, 1, 1, 1]}), "OK"),
    "batch_4097": (dict(op="Relu", inputs={"x": [4097, 1, 1, 1]}), "BATCH_GT_4096"),
    "dynamic_batch": (dict(op="Relu", inputs={"x": ["N", 4, 8, 8]}), "DYNAMIC_SHAPE"),
    "int32_tensor": (dict(op="Relu", inputs=X8, elem=TensorProto.INT32), "NON_FLOAT_TENSOR"),
    "int64_concat_is_not_judged_by_axis": (
        dict(op="Concat", inputs={"x": [2], "z": [2]}, elem=TensorProto.INT64, axis=0),
        "NON_FLOAT_TENSOR",
    ),
    "plugin_op": (dict(op="bev_pool", inputs=X8, domain="bevfusion"), "PLUGIN_OP:bev_pool"),
}


XS = {"x": [1, 4, 8, 8], "z": [1, 4, 8, 8]}
POOL_X = {"x": [1, 4, 8, 8]}
# INT8 range rules, judged with calibration-cache scales: (kwargs, {tensor: scale}, expected)
INT8_CASES = {
    # Concat in INT8: every input's dynamic range equals the output's
    "concat_int8_one_range": (dict(op="Concat", inputs=XS, axis=1), {"x": 0.1, "z": 0.1, "y": 0.1}, "OK"),
    "concat_int8_output_range_differs": (
        dict(op="Concat", inputs=XS, axis=1),
        {"x": 0.1, "z": 0.1, "y": 0.2},
        "CONCAT_INT8_RANGES_DIFFER",
    ),
    "concat_int8_input_ranges_differ": (
        dict(op="Concat", inputs=XS, axis=1),
        {"x": 0.1, "z": 0.3},
        "CONCAT_INT8_RANGES_DIFFER",
    ),
    "concat_fp16_ranges_differ": (
        dict(op="Concat", inputs=XS, axis=1, precision="fp16"),
        {"x": 0.1, "z": 0.3},
        "OK",
    ),
    # Pooling in INT8: input range = output range
    "maxpool_int8_same_range": (dict(op="MaxPool", inputs=POOL_X, kernel_shape=[2, 2]), {"x": 0.1, "y": 0.1}, "OK"),
    "maxpool_int8_ranges_differ": (
        dict(op="MaxPool", inputs=POOL_X, kernel_shape=[2, 2]),
        {"x": 0.1, "y": 0.05},
        "POOL_INT8_RANGES_DIFFER",
    ),
    "avgpool_int8_ranges_differ": (
        dict(op="AveragePool", inputs=POOL_X, kernel_shape=[2, 2]),
        {"x": 0.1, "y": 0.05},
        "POOL_INT8_RANGES_DIFFER",
    ),
    # Add: no NVIDIA document asks for equal INT8 ranges (the rule was dropped)
    "add_int8_ranges_differ": (dict(op="Add", inputs=XS), {"x": 0.1, "z": 0.3, "y": 0.5}, "OK"),
}


def assert_verdict(verdict, expected: str, source: Citation | None = None) -> None:
    """Reason as expected; rejections carry a suggestion and the NVIDIA section (with TensorRT versions) they cite."""
    assert verdict.reason == expected, verdict
    assert verdict.on_dla == (expected == "OK")
    assert (verdict.suggestion is None) == (expected == "OK")
    assert (verdict.source == "") == (expected == "OK")
    if expected != "OK":
        assert verdict.source == str(source or CITATIONS[expected.split(":")[0]]) and "TensorRT" in verdict.source


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_rule(case: str) -> None:
    kwargs, expected = CASES[case]
    assert_verdict(one(**kwargs), expected)


@pytest.mark.parametrize("case", INT8_CASES, ids=list(INT8_CASES))
def test_int8_range_rule(case: str) -> None:
    kwargs, scales, expected = INT8_CASES[case]
    assert_verdict(one(**kwargs, scales=scales), expected)


def test_every_rule_code_has_a_rejecting_case_and_a_citation() -> None:
    tested = {expected.split(":")[0] for *_, expected in [*CASES.values(), *INT8_CASES.values()]}
    assert set(SUGGESTIONS) - tested == set()
    assert set(CITATIONS) == set(SUGGESTIONS) | {"UNSUPPORTED_OP"}
    assert all(c.section and c.versions.startswith(("TensorRT", "unsupported")) for c in CITATIONS.values())


@pytest.mark.parametrize(
    ("op", "trt", "expected"),
    [
        ("Div", "8.5.2", "UNSUPPORTED_OP:Div"),  # JetPack 5.1
        ("Div", "8.6.2", "UNSUPPORTED_OP:Div"),  # JetPack 6.0 DP
        ("Div", "8.6.12", "OK"),  # DRIVE OS 6.0.9
        ("Div", "10.3", "OK"),  # JetPack 6.1 / 6.2
        ("Pow", "8.5.2", "UNSUPPORTED_OP:Pow"),
        ("Pow", "10.3", "OK"),
        ("Pow", "TRT-100300-EntropyCalibration2", "OK"),  # the bundle's calibration-cache tag names the target too
        ("Div", "TRT-8502-EntropyCalibration2", "UNSUPPORTED_OP:Div"),
    ],
)
def test_div_pow_follow_the_tensorrt_target(op: str, trt: str, expected: str) -> None:
    verdict = one(op, X8, {"c": f32(2.0)}, trt=trt)
    assert_verdict(verdict, expected, OP_SINCE_SOURCE)
    if expected != "OK":
        assert "from 8.6.12 on" in verdict.detail and "8.6.12" in verdict.source
        assert verdict.suggestion == (
            "multiply by the reciprocal when the divisor is constant"
            if op == "Div"
            else "GPU only: keep it at a segment boundary so it adds no DLA<->GPU transition"
        )


def test_trt_version_parsing() -> None:
    assert parse_trt_version("10.3") == (10, 3, 0) and parse_trt_version("8.6.12") == (8, 6, 12)
    assert parse_trt_version("TRT-8601-EntropyCalibration2") == (8, 6, 1)
    with pytest.raises(ValueError, match="not a TensorRT version"):
        parse_trt_version("ten")


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "BatchNormalization"])
def test_dla_activations_and_bn(op: str) -> None:
    consts = {k: f32(1, 1, 1, 1) for k in ("s", "b", "m", "v")} if op == "BatchNormalization" else {}
    assert one(op, X8, consts).reason == "OK"


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Max", "Min"])
def test_eltwise_4d(op: str) -> None:
    assert one(op, {"x": [1, 4, 8, 8], "z": [1, 4, 8, 8]}).reason == "OK"
    assert one(op, {"x": [1, 4, 8], "z": [1, 4, 8]}).reason == "RANK_NOT_4"
    assert one(op, {"x": [1, 2, 4, 8, 8], "z": [1, 2, 4, 8, 8]}).reason == "RANK_NOT_4"


GPU_ONLY = {
    "Gelu": (dict(inputs=X8, opset=20), "Relu"),
    "HardSwish": (dict(inputs=X8, opset=14), "Clip"),
    "Mish": (dict(inputs=X8, opset=18), "Relu"),
    "Erf": (dict(inputs=X8), "GELU"),
    "GroupNormalization": (dict(inputs=X8, consts={"s": w(2), "b": w(2)}, opset=18, num_groups=2), "BatchNorm"),
    "InstanceNormalization": (dict(inputs=X8, consts={"s": w(4), "b": w(4)}), "BatchNorm"),
    "LayerNormalization": (dict(inputs=X8, consts={"s": w(8)}), "BatchNorm"),
    "Pad": (dict(inputs=X8, consts={"p": i64(0, 0, 1, 1, 0, 0, 1, 1)}), "Conv's pads"),
    "Expand": (dict(inputs={"x": [1, 4, 1, 1]}, consts={"s": i64(1, 4, 8, 8)}), "broadcast"),
    "Gather": (dict(inputs=X8, consts={"i": i64(0, 1)}, axis=1), "Slice"),
    "ScatterElements": (dict(inputs=X8, consts={"i": np.zeros((1, 4, 8, 8), np.int64)}, names=["x", "i", "x"]), "GPU"),
    "ScatterND": (dict(inputs=X8, consts={"i": np.zeros((1, 1), np.int64)}, names=["x", "i", "x"]), "GPU"),
    "Where": (dict(inputs=X8, consts={"c": np.ones((1, 4, 8, 8), bool)}, names=["c", "x", "x"]), "mask"),
    "Exp": (dict(inputs=X8), "GPU"),
    "Log": (dict(inputs=X8), "GPU"),
    "Sqrt": (dict(inputs=X8), "GPU"),
    "Cast": (dict(inputs=X8, to=TensorProto.FLOAT16), "float"),
    "GridSample": (dict(inputs=X8, consts={"g": w(1, 8, 8, 2)}), "GPU"),
    "NonZero": (dict(inputs=X8), "GPU"),
    "TopK": (dict(inputs=X8, consts={"k": i64(2)}, outs=("y", "idx")), "GPU"),
    "ReduceSum": (dict(inputs=X8, consts={"a": i64(1)}), "GPU"),
}


@pytest.mark.parametrize("op", GPU_ONLY, ids=list(GPU_ONLY))
def test_gpu_only_ops(op: str) -> None:
    kwargs, hint = GPU_ONLY[op]
    verdict = one(op, **kwargs)
    assert (verdict.on_dla, verdict.reason) == (False, f"UNSUPPORTED_OP:{op}")
    assert hint in verdict.suggestion


@pytest.mark.parametrize(
    ("op", "shape", "consts", "attrs", "suggestion"),
    [
        ("GlobalAveragePool", [1, 4, 8, 8], {}, {}, "AveragePool(kernel=stride=[8, 8])"),
        ("GlobalAveragePool", [1, 4, 32, 16], {}, {}, "AveragePool(kernel=stride=[8, 8] then kernel=stride=[4, 2])"),
        ("GlobalMaxPool", [1, 4, 6, 6], {}, {}, "MaxPool(kernel=stride=[6, 6])"),
        ("GlobalAveragePool", [1, 4, 11, 11], {}, {}, "cannot tile 11x11"),
        ("ReduceMean", [1, 4, 4, 4], {}, {"axes": [2, 3]}, "AveragePool(kernel=stride=[4, 4])"),
        ("ReduceMax", [1, 4, 4, 4], {"a": i64(-2, -1)}, {}, "MaxPool(kernel=stride=[4, 4])"),
    ],
)
def test_global_pool_rewrite_suggestion(op, shape, consts, attrs, suggestion) -> None:
    opset = 18 if consts else 17
    verdict = one(op, {"x": shape}, consts, opset=opset, **attrs)
    assert verdict.reason == f"UNSUPPORTED_OP:{op}"
    assert suggestion in verdict.suggestion


def test_pool_stages() -> None:
    assert (pool_stages(8), pool_stages(32), pool_stages(180), pool_stages(1), pool_stages(11)) == (
        [8],
        [8, 4],
        [6, 6, 5],
        [1],
        None,
    )


def test_fp16_layers_are_checked_in_fp16_and_precision_is_validated() -> None:
    kwargs, _ = CASES["slice_int8"]
    node = helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"], name="n")
    model = build([node], kwargs["inputs"], kwargs["consts"])
    assert check_model(model, "int8")[0].reason == "SLICE_INT8"
    assert check_model(model, "int8", fp16_layers=["n"])[0].reason == "OK"
    with pytest.raises(ValueError, match="FP16/INT8"):
        check_model(model, "fp32")


def qdq(x: str, scale: float, out: str, axis=None) -> list[onnx.NodeProto]:
    """Q/DQ pair on `x` with constant scale/zero-point nodes (ModelOpt's export style)."""
    shape = [] if axis is None else [len(np.atleast_1d(scale))]
    s = helper.make_node("Constant", [], [f"{out}_s"], value=helper.make_tensor("s", F32, shape, np.ravel(scale)))
    zp = np.zeros(shape or (), np.int8)
    z = helper.make_node("Constant", [], [f"{out}_z"], value=numpy_helper.from_array(zp, "z"))
    kw = {} if axis is None else {"axis": axis}
    q = helper.make_node("QuantizeLinear", [x, f"{out}_s", f"{out}_z"], [f"{out}_q"], name=f"{out}_Q", **kw)
    dq = helper.make_node("DequantizeLinear", [f"{out}_q", f"{out}_s", f"{out}_z"], [out], name=f"{out}_DQ", **kw)
    return [s, z, q, dq]


def test_qdq_nodes_are_transparent() -> None:
    nodes = [
        *qdq("x", 0.1, "xq"),
        *qdq("w", [0.01] * 4, "wq", axis=0),
        helper.make_node("Conv", ["xq", "wq"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        *qdq("g", [0.01] * 4, "gq", axis=1),
        helper.make_node("Gemm", ["f", "gq"], ["y"], name="fc"),
    ]
    model = build(nodes, {"x": [1, 4, 2, 2]}, {"w": w(4, 4, 3, 3), "g": w(16, 4)})
    verdicts = check_model(model)
    assert [(v.name, v.reason) for v in verdicts] == [("conv", "OK"), ("flat", "RANK_NOT_4"), ("fc", "OK")]


def add_of_two_quantized(s1: float, s2: float) -> onnx.ModelProto:
    nodes = [*qdq("x", s1, "xq"), *qdq("z", s2, "zq"), helper.make_node("Add", ["xq", "zq"], ["y"], name="add")]
    return build(nodes, {"x": [1, 4, 8, 8], "z": [1, 4, 8, 8]})


def concat_of_quantized(s1: float, s2: float, s_out: float) -> onnx.ModelProto:
    nodes = [
        *qdq("x", s1, "xq"),
        *qdq("z", s2, "zq"),
        helper.make_node("Concat", ["xq", "zq"], ["c"], name="cat", axis=1),
        *qdq("c", s_out, "y"),
    ]
    return build(nodes, {"x": [1, 4, 8, 8], "z": [1, 4, 8, 8]})


def test_int8_ranges_read_through_qdq() -> None:
    assert check_model(add_of_two_quantized(0.1, 0.2))[0].reason == "OK"  # no equal-range rule for Add
    assert check_model(concat_of_quantized(0.1, 0.1, 0.1))[0].reason == "OK"
    assert check_model(concat_of_quantized(0.1, 0.2, 0.2))[0].reason == "CONCAT_INT8_RANGES_DIFFER"
    assert check_model(concat_of_quantized(0.1, 0.1, 0.2))[0].reason == "CONCAT_INT8_RANGES_DIFFER"
    assert check_model(concat_of_quantized(0.1, 0.2, 0.2), "fp16")[0].reason == "OK"


# ---------------------------------------------------------------------------------------------------- partition
def conv_node(x: str, y: str, name: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, "w"], [y], name=name, kernel_shape=[1, 1])


def plan_of(nodes, inputs=None, outputs=("y",), consts=None):
    model = build(nodes, inputs or {"x": [1, 4, 8, 8]}, {"w": w(4, 4, 1, 1), **(consts or {})}, outputs, opset=20)
    plan = partition(model, check_model(model))
    json.dumps(plan.to_dict())
    return plan


def test_partition_conv_relu_gelu_conv() -> None:
    plan = plan_of(
        [
            conv_node("x", "a", "c1"),
            helper.make_node("Relu", ["a"], ["b"], name="r"),
            helper.make_node("Gelu", ["b"], ["c"], name="g"),
            conv_node("c", "y", "c2"),
        ]
    )
    assert [(s.device, s.layers) for s in plan.segments] == [("DLA", ["c1", "r"]), ("GPU", ["g"]), ("DLA", ["c2"])]
    assert (plan.dla_loadables, plan.transitions, plan.fits_dla_entirely) == (2, 2, False)
    assert [(s.inputs, s.outputs) for s in plan.segments] == [(["x"], ["b"]), (["b"], ["c"]), (["c"], ["y"])]
    assert plan.op_summary["Gelu"] == {"dla": 0, "gpu": 1, "reasons": {"UNSUPPORTED_OP:Gelu": 1}}
    assert plan.suggestions[0]["layers"] == ["g"] and "Sigmoid" in plan.suggestions[0]["suggestion"]


def test_partition_all_dla_is_one_loadable() -> None:
    plan = plan_of([conv_node("x", "a", "c1"), helper.make_node("Relu", ["a"], ["y"], name="r")])
    assert (plan.dla_loadables, plan.transitions, plan.fits_dla_entirely, plan.suggestions) == (1, 0, True, [])


def test_partition_keeps_a_device_across_independent_branches() -> None:
    # File order c1, e, c2 would give DLA, GPU, DLA; c2 does not depend on e, so both convs share one loadable.
    nodes = [conv_node("x", "a", "c1"), helper.make_node("Exp", ["x"], ["e"], name="e"), conv_node("a", "y", "c2")]
    plan = plan_of(nodes, outputs=("y", "e"))
    assert [(s.device, s.layers) for s in plan.segments] == [("DLA", ["c1", "c2"]), ("GPU", ["e"])]
    assert (plan.dla_loadables, plan.transitions) == (1, 1)


def test_partition_splits_loadables_where_the_dla_batch_changes() -> None:
    nodes = [
        conv_node("x", "a", "c1"),
        helper.make_node("Reshape", ["a", "shape"], ["b"], name="merge_cams"),
        helper.make_node("Conv", ["b", "w24"], ["y"], name="c2", kernel_shape=[1, 1]),
    ]
    consts = {"shape": i64(1, 24, 8, 8), "w24": w(4, 24, 1, 1)}
    plan = plan_of(nodes, {"x": [6, 4, 8, 8]}, consts=consts)
    assert [(s.device, s.batch) for s in plan.segments] == [("DLA", 6), ("DLA", 1)]
    assert (plan.dla_loadables, plan.transitions, plan.fits_dla_entirely) == (2, 0, False)


def test_partition_looks_through_qdq_and_counts_the_loadable_limit() -> None:
    nodes = [*qdq("x", 0.1, "xq"), conv_node("xq", "a", "c1"), *qdq("a", 0.1, "aq"), conv_node("aq", "y", "c2")]
    assert plan_of(nodes).dla_loadables == 1
    chain = [conv_node("x", "a0", "c0")]
    for i in range(16):
        chain += [
            helper.make_node("Exp", [f"a{i}"], [f"e{i}"], name=f"e{i}"),
            conv_node(f"e{i}", f"a{i + 1}", f"c{i + 1}"),
        ]
    chain.append(helper.make_node("Relu", ["a16"], ["y"], name="out"))
    plan = plan_of(chain)
    assert (plan.dla_loadables, plan.transitions, plan.within_loadable_limit) == (17, 32, False)


def test_partition_rejects_verdicts_of_another_model() -> None:
    model = build([conv_node("x", "y", "c")], {"x": [1, 4, 8, 8]}, {"w": w(4, 4, 1, 1)})
    with pytest.raises(ValueError, match="verdicts"):
        partition(model, [])
