"""FP16 overflow check of exported parts: measured activation ranges of real ONNX graphs in onnxruntime, classified
against FP16's 65504 with the producing layer named, and reported by the export (report.json, report.md, the log)."""

import json
from pathlib import Path

import onnx
import pytest
import torch
from helpers import ROOT, TINY
from torch import nn

from bevfusion_ext.compression import atomic_save
from bevfusion_ext.export import fp16_range
from bevfusion_ext.export.fp16_range import AT_RISK_ABOVE, FP16_MAX, activation_ranges, check, overflow_warning
from bevfusion_ext.export.parts import export_onnx
from bevfusion_ext.export.pipeline import ExportOptions, run
from bevfusion_ext.models import build_model, reference_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class Net(nn.Module):
    """conv1 -> relu -> conv2; `gain` scales conv1's weights, made positive so its peak passes the relu."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.conv1.weight.abs_().mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def exported(module: nn.Module, x: torch.Tensor, path: Path) -> onnx.ModelProto:
    return export_onnx(module.eval(), {"x": x}, ("y",), path)


def output_of(graph: onnx.ModelProto, layer: str) -> str:
    return next(n.output[0] for n in graph.graph.node if n.name == layer)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_ranges_tapped_in_small_runs_equal_one_run(x: torch.Tensor, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    graph = exported(Net(gain=3.0), x, tmp_path / "net.onnx")
    whole = activation_ranges(graph, [{"x": x}])
    monkeypatch.setattr(fp16_range, "TAP_BYTES", 8 * 8 * 8 * 4)  # one conv1 output per run: a large part in miniature
    assert len(fp16_range._tap_chunks([r.tensor for r in whole if r.layer], fp16_range.graph_info(graph))) > 1
    assert activation_ranges(graph, [{"x": x}]) == whole


def test_scaled_layer_is_an_overflow_named_by_its_layer_and_value(x: torch.Tensor, tmp_path: Path) -> None:
    net = Net(gain=1e5)
    graph = exported(net, x, tmp_path / "net.onnx")
    conv1 = output_of(graph, "/conv1/Conv")
    result = check(graph, [{"x": x}, {"x": x / 2}], int8_tensors={conv1}, dla_layers={"/conv1/Conv"})
    with torch.no_grad():
        expected = float(net.conv1(x).abs().max())
    assert expected > FP16_MAX
    first = result["overflow"][0]
    assert {k: first[k] for k in ("tensor", "layer", "nonfinite", "int8", "on_dla")} == {
        "tensor": conv1,
        "layer": "/conv1/Conv",
        "nonfinite": False,
        "int8": True,
        "on_dla": True,
    }
    assert first["max_abs"] == pytest.approx(expected, rel=1e-5)  # the larger of the two feeds
    assert [f["layer"] for f in result["overflow"][:2]] == ["/conv1/Conv", "/Relu"]
    assert result["gpu_fp32_layers"][:2] == ["/conv1/Conv", "/Relu"]
    assert result["gpu_fp32_flags"][0].startswith("--layerPrecisions=/conv1/Conv:fp32,/Relu:fp32")
    assert "--precisionConstraints=obey" in result["gpu_fp32_flags"]
    warning = overflow_warning("demo", result)
    assert warning.startswith("WARNING demo: FP16 overflow (> 65504)")
    assert f"layer /conv1/Conv (tensor {conv1}) reaches max |x| {expected:.4g}" in warning
    assert "--layerPrecisions=<layer>:fp32" in warning and "planned on the DLA" in warning


def test_normal_net_has_no_finding_and_its_true_largest_activation(x: torch.Tensor, tmp_path: Path) -> None:
    net = Net(gain=1.0)
    result = check(exported(net, x, tmp_path / "net.onnx"), [{"x": x}])
    with torch.no_grad():
        hidden = net.conv1(x)
        largest = max(float(t.abs().max()) for t in (x, hidden, net.conv2(hidden.relu())))
    assert result["overflow"] == [] and result["at_risk"] == [] and result["gpu_fp32_flags"] == []
    assert result["tensors_checked"] == 4  # the input and the outputs of conv1, relu, conv2
    assert result["max_abs"] == pytest.approx(largest, rel=1e-5)
    assert overflow_warning("demo", result) is None


@pytest.mark.parametrize(
    ("weight", "verdict"), [(1000.0, None), (5000.0, "at_risk"), (30000.0, "overflow"), (-30000.0, "overflow")]
)
def test_threshold_classification(weight: float, verdict: str | None, tmp_path: Path) -> None:
    """A 1x1 conv of constant weight on ones outputs exactly 3 x weight."""
    conv = nn.Conv2d(3, 1, 1, bias=False)
    nn.init.constant_(conv.weight, weight)
    ones = torch.ones(1, 3, 2, 2)
    result = check(exported(conv, ones, tmp_path / "conv.onnx"), [{"x": ones}])
    assert result["max_abs"] == 3 * abs(weight) and AT_RISK_ABOVE == FP16_MAX / 8
    found = {kind: [f["layer"] for f in result[kind]] for kind in ("overflow", "at_risk")}
    assert found == {kind: ["/Conv"] if kind == verdict else [] for kind in ("overflow", "at_risk")}


def test_graph_input_beyond_fp16_is_an_overflow_without_a_layer(x: torch.Tensor, tmp_path: Path) -> None:
    big = x * 1e5
    result = check(exported(Net(gain=1.0), x, tmp_path / "net.onnx"), [{"x": big}])
    first = result["overflow"][0]
    assert (first["tensor"], first["layer"]) == ("x", None)
    assert first["max_abs"] == pytest.approx(float(big.max()))
    assert "input x reaches max |x|" in overflow_warning("demo", result)


class Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x) * 0.5


def test_inf_in_fp32_is_an_overflow(tmp_path: Path) -> None:
    x = torch.tensor([[0.0, 1.0, 2.0]])
    result = check(exported(Log(), x, tmp_path / "log.onnx"), [{"x": x}])
    assert [(f["layer"], f["nonfinite"]) for f in result["overflow"]] == [("/Log", True), ("/Mul", True)]
    assert result["overflow"][0]["max_abs"] == pytest.approx(float(torch.log(x[0, 2])))  # over the finite values
    assert "reaches max |x| inf/nan" in overflow_warning("log", result)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[float, tuple[Path, dict, list[str]]]:
    """The tiny reference model exported (fuser + head.map) as is and with the fuser's conv weights x 1e7."""
    out = {}
    for gain in (1.0, 1e7):
        root = tmp_path_factory.mktemp(f"gain{gain:g}")
        torch.manual_seed(0)
        model = build_model(reference_config("tiny"))
        with torch.no_grad():
            model.fuser[0].weight.mul_(gain)
        atomic_save({"meta": {}, "state_dict": model.state_dict()}, root / "tiny.pth")
        options = ExportOptions(
            config=str(ROOT / TINY),
            checkpoint=str(root / "tiny.pth"),
            out=root / "deploy",
            parts=["fuser", "head.map"],
            allow_dense=True,
        )
        lines: list[str] = []
        run(options, log=lines.append)
        out[gain] = root / "deploy", json.loads((root / "deploy" / "report.json").read_text()), lines
    return out


def test_export_reports_the_scaled_layer_in_json_markdown_and_log(exports: dict) -> None:
    out, report, lines = exports[1e7]
    fuser, head = report["parts"]["fuser"]["fp16_range"], report["parts"]["head.map"]["fp16_range"]
    first = fuser["overflow"][0]
    assert first["layer"] == "/fuser/fuser.0/Conv" and first["max_abs"] > FP16_MAX and not first["nonfinite"]
    assert [f["tensor"] for f in head["overflow"] + head["at_risk"]][0] == "bev_features"  # the fuser's output
    assert "/fuser/fuser.0/Conv:fp32" in fuser["gpu_fp32_flags"][0]
    command = report["parts"]["fuser"]["commands"]["gpu_fp16"]
    assert command[-3:] == fuser["gpu_fp32_flags"] and "--fp16" in command  # the GPU FP16 engine keeps them FP32
    assert fuser["gpu_fp32_flags"][0] in (out / "scripts" / "build_engines.sh").read_text()
    text = (out / "report.md").read_text()
    section = text[text.index("## FP16 range") : text.index("## GPU kernels")]
    assert f"`/fuser/fuser.0/Conv` {first['max_abs']:.3g}" in section
    assert "- **fuser** overflows FP16" in section and "--layerPrecisions=/fuser/fuser.0/Conv:fp32" in section
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == len([r for r in (fuser, head) if r["overflow"]])
    assert warnings[0].startswith("WARNING fuser: FP16 overflow") and "layer /fuser/fuser.0/Conv" in warnings[0]
    assert f"{first['max_abs']:.4g}" in warnings[0]


def test_unmodified_model_reports_no_overflow(exports: dict) -> None:
    out, report, lines = exports[1.0]
    for name, entry in report["parts"].items():
        result = entry["fp16_range"]
        assert result["overflow"] == [] and result["at_risk"] == [], name
        assert 0 < result["max_abs"] < AT_RISK_ABOVE and result["tensors_checked"] > 0, name
    assert not [line for line in lines if line.startswith("WARNING")]
    peak = report["parts"]["fuser"]["fp16_range"]
    where = peak["max_abs_layer"] or peak["max_abs_tensor"]  # a graph input has no producing layer
    row = f"| fuser | {peak['max_abs']:.4g} (`{where}`) | {FP16_MAX / peak['max_abs']:.1f}x | - | - |"
    assert row in (out / "report.md").read_text()
