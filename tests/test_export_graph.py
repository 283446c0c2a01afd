"""The DLA INT8 path on a real ModelOpt QAT export (calibration cache round trip, Q/DQ strip parity, FP16 list),
the trtexec commands and bundle scripts, the TensorRT-absent path and the roofline projection."""

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import modelopt.torch.quantization as mtq
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bevfusion_ext.export import (
    PEAKS,
    TensorRTUnavailable,
    build_engine,
    calib_tag,
    check_model,
    commands,
    dla_io_format,
    fp16_layers,
    io_formats_from_onnx,
    partition,
    propagate_scales,
    read_calib_cache,
    roofline,
    scales_from_qdq,
    strip_qdq,
    tensorrt_available,
    write_build_scripts,
    write_calib_cache,
)
from bevfusion_ext.export.roofline import LAUNCH_MS, LOADABLE_MS, TRANSITION_MS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:Cannot find transformers package"),
]


class Net(nn.Module):
    """Conv-BN-ReLU, strided conv, max pool, 1x1 conv, global pool and a linear head: every quantizer kind."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(self.stem(img))), 1))


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    """(float model, ModelOpt-quantized model, Q/DQ ONNX, its stripped twin, input) for the whole module."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    net = Net().eval()
    with torch.no_grad():
        net.stem[1].running_mean.uniform_(-0.2, 0.2)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    fp = copy.deepcopy(net)
    quantized = mtq.quantize(net, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    path = tmp_path_factory.mktemp("qat") / "net_qdq.onnx"
    torch.onnx.export(quantized, (x,), path, opset_version=17, dynamo=False, input_names=["img"], output_names=["out"])
    qdq = onnx.load(path)
    return fp, quantized, qdq, strip_qdq(qdq), x


def input_quantizers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.input_quantizer.amax
        for name, m in model.named_modules()
        if hasattr(m, "input_quantizer") and m.input_quantizer.is_enabled and m.input_quantizer.amax is not None
    }


def test_calibration_cache_round_trip_gives_amax_over_127(qat, tmp_path) -> None:
    _, quantized, qdq, stripped, _ = qat
    scales = scales_from_qdq(qdq)
    cache = tmp_path / "net.cache"
    write_calib_cache(propagate_scales(stripped, scales), cache)
    header, *lines = cache.read_text().splitlines()
    assert header == "TRT-8601-EntropyCalibration2"
    assert all(re.fullmatch(r"\S+: [0-9a-f]{8}", line) for line in lines)
    parsed = read_calib_cache(cache)
    quantizers = input_quantizers(quantized)
    assert len(quantizers) == len(scales) == 6  # three convs, max pool, global pool, linear
    q_nodes = {n.name: n for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    for module, amax in quantizers.items():
        [node] = [n for name, n in q_nodes.items() if name.endswith(f"/{module}/input_quantizer/QuantizeLinear")]
        expected = (amax.float() / 127).item()
        assert parsed[node.input[0]] == scales[node.input[0]] == expected, module
    assert {parsed[k] for k in parsed} == set(scales.values())  # propagation only copies existing scales
    assert set(scales) <= set(parsed)


def test_strip_qdq_matches_fake_quantized_weights(qat) -> None:
    fp, quantized, qdq, stripped, x = qat
    assert not {n.op_type for n in stripped.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    assert [i.name for i in stripped.graph.input] == ["img"] and [o.name for o in stripped.graph.output] == ["out"]
    # Weights: bit-identical to what the Q/DQ graph's DequantizeLinear computes in onnxruntime.
    dq_of = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    weight_dq = {n.input[0]: dq_of[n.output[0]] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    probe = copy.deepcopy(qdq)
    inits = {i.name: numpy_helper.to_array(i) for i in stripped.graph.initializer}
    folded = [name for name in weight_dq if name in inits]
    assert len(folded) == 4  # three convs and the linear layer: weights fold, activations do not
    probe.graph.output.extend(helper.make_tensor_value_info(weight_dq[n], TensorProto.FLOAT, None) for n in folded)
    ort_weights = ort.InferenceSession(probe.SerializeToString()).run(
        [weight_dq[n] for n in folded], {"img": x.numpy()}
    )
    for name, value in zip(folded, ort_weights, strict=True):
        np.testing.assert_array_equal(inits[name], value, err_msg=name)
    # Outputs: the float model with fake-quantized weights and no activation quantization.
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in fp.named_modules():
            if hasattr(modules[name], "weight_quantizer"):
                m.weight.copy_(modules[name].weight_quantizer(modules[name].weight))
        expected = fp(x).numpy()
    got = ort.InferenceSession(stripped.SerializeToString()).run(None, {"img": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_fp16_layers_list_unscaled_inputs_and_sensitive_layers(qat) -> None:
    _, _, qdq, stripped, _ = qat
    scales = scales_from_qdq(qdq)
    names = {n.op_type: n.name for n in stripped.graph.node}
    # Without propagation, the Relus (after Conv / Conv+BN, which TensorRT fuses) and the Flatten read no scale.
    assert [n.split("/")[-1] for n in fp16_layers(stripped, scales)] == ["Relu", "Relu", "Flatten"]
    assert fp16_layers(stripped, propagate_scales(stripped, scales)) == []
    conv = names["Conv"]
    assert fp16_layers(stripped, propagate_scales(stripped, scales), sensitive=[conv]) == [conv]
    with pytest.raises(ValueError, match="not in the model"):
        fp16_layers(stripped, scales, sensitive=["nope"])
    verdicts = check_model(stripped, scales=propagate_scales(stripped, scales))
    assert {v.op_type: v.reason for v in verdicts}["GlobalAveragePool"] == "UNSUPPORTED_OP:GlobalAveragePool"


def test_scale_extraction_rejects_what_tensorrt_cannot_use(tmp_path) -> None:
    def model(zero_point: int) -> onnx.ModelProto:
        s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
        z = numpy_helper.from_array(np.array(zero_point, np.int8), "z")
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="Q"),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="DQ"),
        ]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 2, 2]) for n in ("x", "y")]
        return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], [s, z]))

    assert scales_from_qdq(model(0)) == {"x": pytest.approx(0.1)}
    with pytest.raises(ValueError, match="symmetric"):
        scales_from_qdq(model(3))
    bad = tmp_path / "bad.cache"
    bad.write_text("not a cache\n")
    with pytest.raises(ValueError, match="header"):
        read_calib_cache(bad)
    assert (calib_tag("8.6.1"), calib_tag("10.3.0")) == (
        "TRT-8601-EntropyCalibration2",
        "TRT-100300-EntropyCalibration2",
    )


def test_strip_qdq_folds_int8_weight_initializers_and_rejects_stray_quantizers() -> None:
    w_int = np.arange(-8, 8, dtype=np.int8).reshape(4, 4, 1, 1)
    scale = np.array([0.5, 0.25, 0.125, 1.0], np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w_int, "w_int"), (scale, "s"), (np.zeros(4, np.int8), "z"))]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_int", "s", "z"], ["w"], name="DQ", axis=0),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1]),
    ]
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 2, 2]) for n in ("x", "y"))
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    stripped = strip_qdq(model)
    [weight] = stripped.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(weight), w_int * scale[:, None, None, None])
    feed = {"x": np.random.default_rng(0).standard_normal((1, 4, 2, 2)).astype(np.float32)}
    run = [ort.InferenceSession(m.SerializeToString()).run(None, feed)[0] for m in (model, stripped)]
    np.testing.assert_allclose(*run, rtol=1e-6)  # same weights; the conv kernel may sum in another order
    quantize = helper.make_node("QuantizeLinear", ["x", "s0"], ["q"], name="Q")
    cast = helper.make_node("Cast", ["q"], ["y"], name="cast", to=TensorProto.FLOAT)
    s0 = numpy_helper.from_array(np.array(0.1, np.float32), "s0")
    with pytest.raises(ValueError, match="other than a DequantizeLinear"):
        strip_qdq(helper.make_model(helper.make_graph([quantize, cast], "g", [x], [y], [s0])))


# ---------------------------------------------------------------------------------------------------- trtexec
PATHS = {"fp16": "onnx/cam.onnx", "qdq": "onnx/cam_qdq.onnx", "noqdq": "onnx/cam_noqdq.onnx"}
IO = {"inputs": ["int8:dla_hwc4"], "outputs": ["fp16:chw16"]}
DLA_COMMON = (
    "trtexec --skipInference --onnx=onnx/cam_noqdq.onnx --calib=calib/cam.cache --int8 --fp16 "
    "--precisionConstraints=prefer --layerPrecisions=/a/Softmax:fp16,/b/Slice:fp16 "
    "--memPoolSize=dlaSRAM:1,dlaLocalDRAM:1024,dlaGlobalDRAM:512"
)


def engine(key: str) -> str:
    stem = f"engines/cam.{key}"
    return f"--saveEngine={stem}.engine --exportLayerInfo={stem}.layers.json --profilingVerbosity=detailed"


EXPECTED = {
    "gpu_fp16": f"trtexec --skipInference --onnx=onnx/cam.onnx --fp16 {engine('gpu_fp16')}",
    "gpu_int8": f"trtexec --skipInference --onnx=onnx/cam_qdq.onnx --int8 --fp16 {engine('gpu_int8')}",
    "dla0": f"{DLA_COMMON} --useDLACore=0 --allowGPUFallback {engine('dla0')}",
    "dla1": f"{DLA_COMMON} --useDLACore=1 --allowGPUFallback {engine('dla1')}",
    "dla_standalone": f"{DLA_COMMON} --useDLACore=0 --buildDLAStandalone --inputIOFormats=int8:dla_hwc4 "
    "--outputIOFormats=fp16:chw16 --saveEngine=engines/cam.dla_standalone.loadable",
}


def cam_commands() -> dict[str, list[str]]:
    return commands("cam", PATHS, "calib/cam.cache", ["/a/Softmax", "/b/Slice"], IO)


def test_trtexec_command_text() -> None:
    assert {k: " ".join(v) for k, v in cam_commands().items()} == EXPECTED
    no_fp16 = commands("cam", {"noqdq": PATHS["noqdq"]}, "calib/cam.cache", [], IO)
    assert not any(a.startswith("--layerPrecisions") for a in no_fp16["dla0"])
    with pytest.raises(ValueError, match="calibration cache"):
        commands("cam", {"noqdq": "x.onnx"})
    with pytest.raises(ValueError, match="flavours"):
        commands("cam", {"int4": "x.onnx"})


def test_dla_io_formats(tmp_path) -> None:
    assert [dla_io_format(c) for c in (1, 3, 4, 8)] == ["int8:dla_hwc4"] * 3 + ["int8:chw32"]
    assert dla_io_format(8, "fp16") == "fp16:chw16"
    nodes = [helper.make_node("Conv", ["img", "w"], ["y"], kernel_shape=[1, 1])]
    io = [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8, 8])]
    weight = numpy_helper.from_array(np.zeros((64, 3, 1, 1), np.float32), "w")
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", io, out, [weight])), tmp_path / "m.onnx")
    assert io_formats_from_onnx(tmp_path / "m.onnx") == {"inputs": ["int8:dla_hwc4"], "outputs": ["fp16:chw16"]}


def test_build_scripts(tmp_path) -> None:
    scripts = write_build_scripts(tmp_path, {"cam": cam_commands()})
    assert [p.name for p in scripts] == ["build_engines.sh", "benchmark.sh", "tegrastats_power.sh"]
    for path in scripts:
        text = path.read_text()
        assert os.access(path, os.X_OK) and text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        subprocess.run(["bash", "-n", str(path)], check=True)
    bench = scripts[1].read_text()
    assert "bench cam.dla1 --loadEngine=engines/cam.dla1.engine --useDLACore=1\n" in bench
    assert "bench cam.gpu_int8 --loadEngine=engines/cam.gpu_int8.engine\n" in bench
    assert "bench cam.dla_standalone" not in bench
    assert "tegrastats --interval 100 --logfile logs/tegrastats.log &" in scripts[2].read_text()
    # The script's own plumbing (cd, mkdir, ONLY filter, logs) with `echo` standing in for the binary.
    env = {**os.environ, "TRTEXEC": "echo", "ONLY": "cam.dla1"}
    subprocess.run(["bash", str(scripts[0])], check=True, env=env, capture_output=True, cwd="/")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["cam.dla1.build.log"]
    assert (tmp_path / "logs" / "cam.dla1.build.log").read_text().strip() == EXPECTED["dla1"].removeprefix("trtexec ")


def test_build_scripts_are_shellcheck_clean(tmp_path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n still checks the syntax")
    scripts = write_build_scripts(tmp_path, {"cam": cam_commands()})
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# -------------------------------------------------------------------------------------------------- TensorRT
def test_tensorrt_absent_is_reported_and_skipped(tmp_path) -> None:
    ok, reason = tensorrt_available()
    if ok:
        pytest.skip(f"TensorRT can build here ({reason}); this test covers machines without it")
    if importlib.util.find_spec("tensorrt") is None:
        assert reason.startswith("tensorrt not importable")
    else:
        assert reason.startswith("no CUDA GPU")
    with pytest.raises(TensorRTUnavailable, match=re.escape(reason.split(" (")[0])):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.engine", "qdq")
    with pytest.raises(ValueError, match="calibration cache"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.engine", "noqdq", dla_core=0)
    with pytest.raises(ValueError, match="dla_core"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.engine", "fp16", standalone=True)


def test_tensorrt_build_module_imports_without_tensorrt() -> None:
    code = "import sys, bevfusion_ext.export.tensorrt_build; assert 'tensorrt' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -------------------------------------------------------------------------------------------------- roofline
def conv_model(channels: int, hw: int = 64) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weight = numpy_helper.from_array(np.zeros((channels, channels, 3, 3), np.float32), "w")
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [weight]))


def test_roofline_flops_bytes_and_labels() -> None:
    small, big = roofline(conv_model(64)), roofline(conv_model(128))
    assert small["gflops"] == 2 * 64 * 64 * 64 * 64 * 9 / 1e9  # 2 * Cout * H * W * Cin * k * k
    assert big["gflops"] / small["gflops"] == 4.0
    assert small["weight_mb"] == 64 * 64 * 9 / 1e6 and small["activation_mb"] == 2 * 64 * 64 * 64 / 1e6
    assert small["label"] == "projection" and small["assumptions"]
    assert small["peaks_used"] == {
        "gpu_ops_per_s": PEAKS["gpu"]["int8"],
        "dla_core_ops_per_s": PEAKS["dla_core"]["int8"],
        "dram_bytes_per_s": 204.8e9,
    }
    ms = small["projected_ms"]
    compute_ms = 1e3 * small["gflops"] * 1e9 / 85e12  # compute-bound at 85 dense TOPS
    assert ms["gpu"] == pytest.approx(compute_ms + LAUNCH_MS)  # one kernel
    assert ms["dla_core"] > ms["gpu"]
    assert roofline(conv_model(64), "fp16")["projected_ms"]["gpu"] == pytest.approx(2 * compute_ms + LAUNCH_MS)
    assert roofline(conv_model(64), "fp32")["projected_ms"]["dla_core"] is None


def conv_then(ops: list[str], extra_reader: bool = False) -> onnx.ModelProto:
    """conv -> ops[0] -> ops[1] ... (Add/Mul take the graph input `r` second); optionally a second reader of `c`."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1])]
    for i, op in enumerate(ops):
        inputs = [nodes[-1].output[0], "r"] if op in ("Add", "Mul") else [nodes[-1].output[0]]
        nodes.append(helper.make_node(op, inputs, [f"t{i}"], name=f"{op.lower()}{i}"))
    shape = [1, 16, 32, 32]
    x, r = (helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "r"))
    extra = [helper.make_node("Relu", ["c"], ["c2"], name="other")] if extra_reader else []
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in [nodes[-1], *extra]]
    weight = numpy_helper.from_array(np.ones((16, 16, 1, 1), np.float32), "w")
    return helper.make_model(helper.make_graph(nodes + extra, "g", [x, r], outputs, [weight]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_roofline_fuses_pointwise_layers_into_their_producer() -> None:
    layers = {c["name"]: c for c in roofline(conv_then(["Relu", "Add"]), "fp16")["layers"]}
    element = 16 * 32 * 32
    assert layers["relu0"]["fused"] and layers["relu0"]["activation_bytes"] == 0  # Conv + ReLU: one kernel
    assert layers["add1"]["fused"] and layers["add1"]["activation_bytes"] == 2 * element  # reads only the residual
    assert layers["conv"]["activation_bytes"] == 2 * 2 * element
    report = roofline(conv_then(["Relu", "Add"]), "fp16")
    assert report["fused_layers"] == 2
    assert report["projected_ms"]["gpu"] == pytest.approx(
        1e3 * sum(max(c["flops"] / 42.5e12, (c["weight_bytes"] + c["activation_bytes"]) / 204.8e9)
                  for c in report["layers"]) + LAUNCH_MS)  # one launch for the fused kernel


def test_roofline_does_not_fuse_a_tensor_another_layer_reads() -> None:
    layers = {c["name"]: c for c in roofline(conv_then(["Relu"], extra_reader=True), "fp16")["layers"]}
    assert not layers["relu0"]["fused"] and layers["relu0"]["activation_bytes"] == 2 * 2 * 16 * 32 * 32


def test_roofline_runs_pinned_layers_in_fp16_inside_an_int8_part() -> None:
    int8 = roofline(conv_model(64), "int8")
    pinned = roofline(conv_model(64), "int8", fp16_layers={"conv"})
    assert int8["layer_precisions"] == {"int8": 1} and pinned["layer_precisions"] == {"fp16": 1}
    assert pinned["layers"][0]["weight_bytes"] == 2 * int8["layers"][0]["weight_bytes"]
    assert pinned["projected_ms"]["gpu"] - LAUNCH_MS == pytest.approx(2 * (int8["projected_ms"]["gpu"] - LAUNCH_MS))


def test_roofline_of_a_plan_counts_both_units_and_the_crossing() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r1"),
        helper.make_node("Gelu", ["a"], ["b"], name="g"),
        helper.make_node("Relu", ["b"], ["y"], name="r2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 20)])
    report = roofline(model, "int8", partition(model, check_model(model)))
    per_layer = 2 * 16 * 64 * 64 / 204.8e9 * 1e3  # memory-bound: read + write one INT8 byte per element
    crossing = 2 * 2 * 16 * 64 * 64 / 204.8e9 * 1e3  # 'a' and 'b' cross DLA<->GPU: written and read once more
    plan = partition(model, check_model(model))
    fixed = LAUNCH_MS + TRANSITION_MS * plan.transitions + LOADABLE_MS * plan.dla_loadables  # Gelu alone on the GPU
    assert (plan.transitions, plan.dla_loadables) == (2, 2)
    assert report["projected_ms"]["gpu"] == pytest.approx(3 * per_layer + 3 * LAUNCH_MS)
    assert report["projected_ms"]["plan"] == pytest.approx(3 * per_layer + crossing + fixed)
