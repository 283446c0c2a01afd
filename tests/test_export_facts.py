"""Export facts the Orin build relies on: every tensor a generated trtexec command asks to be INT8 has a scale in that
command's calibration cache (walked over a real quantized bundle of the tiny model), scales propagate into Concat
inputs the way the DLA's INT8 Concat needs, and the placement follows the bundle's TensorRT target."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import ROOT, TINY, warm_bn
from onnx import TensorProto, helper, numpy_helper

from bevfusion_ext.compression.quantization import QuantSpec, calibrate, quantize_model
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.export import (
    calib_tag,
    check_model,
    fp16_layers,
    io_formats_from_onnx,
    propagate_scales,
    read_calib_cache,
    write_calib_cache,
)
from bevfusion_ext.export.parts import PARTS, capture, first_sample
from bevfusion_ext.export.pipeline import ExportOptions, export_bundle, export_part
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.runner.train import prepare_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
DLA_PARTS = [name for name, part in PARTS.items() if part.target == "dla"]
F32 = TensorProto.FLOAT


def flag(argv: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")), None)


def int8_io_tensors(argv: list[str], root: Path) -> list[str]:
    """The ONNX tensors a trtexec command asks to be INT8 through --inputIOFormats / --outputIOFormats."""
    graph = onnx.load(str(root / flag(argv, "--onnx")), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    tensors = {
        "--inputIOFormats": [vi.name for vi in graph.input if vi.name not in initializers],
        "--outputIOFormats": [vi.name for vi in graph.output],
    }
    int8 = []
    for name, names in tensors.items():
        formats = flag(argv, name)
        if formats is None:
            continue
        formats = formats.split(",")
        assert len(formats) == len(names), f"{name}={formats} for tensors {names}"  # trtexec would refuse it
        int8 += [t for t, f in zip(names, formats, strict=True) if f.startswith("int8:")]
    return int8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, torch.nn.Module, dict]:
    """The tiny model quantized (ModelOpt, BN folded), max-calibrated, and exported: every part meant for the DLA."""
    torch.manual_seed(0)
    dataset = SyntheticBEVDataset(4, seed=0, split="val")
    batches = [collate([dataset[i], dataset[i + 1]]) for i in (0, 2)]
    model = warm_bn(build_model(reference_config("tiny")), batches)
    spec = QuantSpec(fold_bn=True)
    quantize_model(model, spec)
    calibrate(model, spec, batches, lambda m, batch: m(return_loss=False, **batch))
    cfg, _ = prepare_config(str(ROOT / TINY), [])
    root = tmp_path_factory.mktemp("bundle")
    options = ExportOptions(config=TINY, checkpoint="(in memory)", out=root)
    source = {"config": TINY, "checkpoint": "(in memory)", "pruning_events": 0}
    report = export_bundle(model, cfg, batches[0], root, options, source, DLA_PARTS, log=lambda line: None)
    return root, report, model, batches[0]


def test_every_int8_io_tensor_of_every_command_has_a_cache_scale(bundle: tuple) -> None:
    root, report, *_ = bundle
    script = (root / "scripts" / "build_engines.sh").read_text()
    checked = {}
    for name, entry in report["parts"].items():
        for target, argv in entry["commands"].items():
            assert f"build {name}.{target} " in script  # the walked commands are the script's
            int8 = int8_io_tensors(argv, root)
            if int8:
                cache = read_calib_cache(root / flag(argv, "--calib"))
                assert not [t for t in int8 if t not in cache], f"{name}.{target}: INT8 I/O without a cache scale"
                checked[f"{name}.{target}"] = int8
    assert checked["fuser.dla_standalone"] == ["camera_bev", "lidar_bev"]  # the case the old cache writer missed
    assert set(checked) == {f"{name}.dla_standalone" for name in DLA_PARTS}


def test_fuser_concat_runs_int8_on_the_dla_with_one_range(bundle: tuple) -> None:
    root, report, *_ = bundle
    entry = report["parts"]["fuser"]
    cache = read_calib_cache(root / entry["files"]["cache"])
    concat = next(n for n in entry["placement"]["nodes"] if n["op_type"] == "Concat" and n["name"].startswith("/fuser"))
    graph = onnx.load(str(root / entry["files"]["noqdq"]))
    node = next(n for n in graph.graph.node if n.name == concat["name"])
    assert {cache[t] for t in [*node.input, *node.output]} == {cache[node.output[0]]}  # one range, as the DLA needs
    assert concat["on_dla"] and concat["name"] not in entry["fp16_layers"]  # INT8, no longer pinned to FP16


def test_placement_follows_the_bundles_tensorrt_target(bundle: tuple, tmp_path: Path) -> None:
    """The tiny Swin's exact GELU divides by sqrt(2): no DLA Div before TensorRT 8.6.12, a rank-3 Div on 10.3."""
    *_, batch = bundle
    model = build_model(reference_config("tiny")).eval()
    entry = export_part(
        model, PARTS["camera.backbone"], capture(model, first_sample(batch)), tmp_path, calib_tag("8.5.2"), 0
    )
    divs = [n for n in entry["placement"]["nodes"] if n["op_type"] == "Div"]
    assert divs and {n["reason"] for n in divs} == {"UNSUPPORTED_OP:Div"}
    assert all("TensorRT 8.5.2 has no DLA Div" in n["detail"] for n in divs)
    graph = onnx.load(str(tmp_path / entry["files"]["onnx"]))
    assert {v.reason for v in check_model(graph, "fp16", trt_version="10.3") if v.op_type == "Div"} == {"RANK_NOT_4"}


def const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32), name))


def fuser_like(extra_reader: bool = False) -> onnx.ModelProto:
    """cat(a, b) -> Q/DQ -> conv, like the fuser: the quantizer sits after the concat, the inputs have none."""
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        const("s", 0.05),
        helper.make_node("QuantizeLinear", ["cat", "s"], ["cat_q"], name="q"),
        helper.make_node("DequantizeLinear", ["cat_q", "s"], ["cat_dq"], name="dq"),
        helper.make_node("Conv", ["cat_dq", "w"], ["y"], name="conv", kernel_shape=[1, 1]),
        *([helper.make_node("Relu", ["b"], ["r"], name="other")] if extra_reader else []),
    ]
    inputs = [helper.make_tensor_value_info(n, F32, [1, 2, 4, 4]) for n in ("a", "b")]
    outputs = [helper.make_tensor_value_info(n, F32, None) for n in ("y", "r")[: 1 + extra_reader]]
    weight = numpy_helper.from_array(np.full((4, 4, 1, 1), 0.1, np.float32), "w")
    graph = helper.make_graph(nodes, "g", inputs, outputs, [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_concat_output_scale_reaches_its_unscaled_inputs() -> None:
    scales = propagate_scales(fuser_like(), {"cat": 0.05})
    assert scales == {"cat": 0.05, "a": 0.05, "b": 0.05}
    # an input something else reads keeps no borrowed scale: that reader ran in float in the QAT model
    assert propagate_scales(fuser_like(extra_reader=True), {"cat": 0.05}) == {"cat": 0.05, "a": 0.05}
    assert fp16_layers(fuser_like(), scales) == [] and check_model(fuser_like(), scales=scales)[0].reason == "OK"


def test_concat_and_pool_carry_one_input_scale_downstream() -> None:
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("AveragePool", ["cat"], ["y"], name="pool", kernel_shape=[2, 2]),
    ]
    inputs = [helper.make_tensor_value_info(n, F32, [1, 2, 4, 4]) for n in ("a", "b")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F32, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert propagate_scales(model, {"a": 0.1, "b": 0.1}) == {"a": 0.1, "b": 0.1, "cat": 0.1, "y": 0.1}
    assert propagate_scales(model, {"a": 0.1, "b": 0.2}) == {"a": 0.1, "b": 0.2}  # a Concat of two ranges: unknown


def test_standalone_io_formats_ask_int8_only_for_scaled_inputs(tmp_path: Path) -> None:
    path, cache = tmp_path / "m.onnx", tmp_path / "m.cache"
    onnx.save(fuser_like(), str(path))
    write_calib_cache({"a": 0.05, "cat": 0.05}, cache)
    assert io_formats_from_onnx(path, cache) == {"inputs": ["int8:chw32", "fp16:chw16"], "outputs": ["fp16:chw16"]}
    assert io_formats_from_onnx(path)["inputs"] == ["int8:chw32", "int8:chw32"]  # no cache: the caller's promise
