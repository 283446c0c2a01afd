"""Check the export's roofline projection against a measured Orin stage: CUDA-CenterPoint's "RPN + Head".

NVIDIA publishes per-stage Orin latencies for CUDA-CenterPoint (NVIDIA-AI-IOT/Lidar_AI_Solution, CUDA-CenterPoint
README, "Average perf on A30 and Orin using the nuScenes validation dataset": DRIVE Orin, TensorRT 8.4, RPN + Head
FP16 11.3 ms / INT8 7.0 ms); CUDA-BEVFusion publishes whole frames only. The RPN + CenterHead stage is the same family
as BEVFusion's decoder (SECOND + SECONDFPN at 180 x 180). This script builds that network from CenterPoint's nuScenes
config (nusc_centerpoint_voxelnet_0075voxel_fix_bn_z: RPN layer_nums [5, 5], strides [1, 2], filters [128, 256],
upsample strides [1, 2] -> [256, 256], 256 input channels; CenterHead shared conv 64, six tasks with reg 2, height 1,
dim 3, rot 2, vel 2 and 1-2 heatmap classes, each branch conv3x3 64 + BN + ReLU then conv3x3), exports it to ONNX the
way the deploy bundle does, projects it with bevfusion_ext.export.roofline, and reports projection / measurement.
With --trtexec-log (CUDA-CenterPoint/model/rpn_centerhead_sim.8503.log from that repository) it first checks that
every convolution of the built network has the shapes of the engine NVIDIA built.

    .venv/bin/python benchmarks/roofline_check.py [--trtexec-log rpn_centerhead_sim.8503.log]
"""
from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import torch
from common import save, write_section
from onnx import shape_inference
from torch import nn

from bevfusion_ext.export.roofline import ASSUMPTIONS, roofline

MEASURED_MS = {"fp16": 11.3, "int8": 7.0}  # CUDA-CenterPoint README, Orin column of "RPN + Head"
SOURCE = ("NVIDIA-AI-IOT/Lidar_AI_Solution CUDA-CenterPoint/README.md, table 'Average perf on A30 and Orin using the "
          "nuScenes validation dataset' (DRIVE Orin 6.0.3.0, TensorRT 8.4.10.4), row 'RPN + Head'")
BEV, IN_CHANNELS = 180, 256
TASK_CLASSES = (1, 2, 2, 1, 2, 2)
BRANCHES = {"reg": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2}


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = False) -> list[nn.Module]:
    """Conv + BN + ReLU, the unit of both the RPN and the head branches."""
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU()]


class RPN(nn.Module):
    """CenterPoint's RPN (det3d necks/rpn.py) for the nuScenes 0.075 m voxel config."""

    def __init__(self) -> None:
        super().__init__()
        self.block0 = nn.Sequential(*conv_bn_relu(IN_CHANNELS, 128), *self.repeated(128))
        self.block1 = nn.Sequential(*conv_bn_relu(128, 256, stride=2), *self.repeated(256))
        self.up0 = nn.Sequential(*conv_bn_relu(128, 256, kernel=1))
        self.up1 = nn.Sequential(nn.ConvTranspose2d(256, 256, 2, 2, bias=False), nn.BatchNorm2d(256), nn.ReLU())

    @staticmethod
    def repeated(channels: int, layers: int = 5) -> list[nn.Module]:
        """`layers` stride-1 Conv + BN + ReLU units at a constant width."""
        return [m for _ in range(layers) for m in conv_bn_relu(channels, channels)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.block0(x)
        return torch.cat([self.up0(a), self.up1(self.block1(a))], dim=1)


class CenterHead(nn.Module):
    """CenterPoint's CenterHead (det3d bbox_heads/center_head.py): shared conv, then one SepHead per task."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Sequential(*conv_bn_relu(512, 64, bias=True))
        self.branches = nn.ModuleList(
            nn.Sequential(*conv_bn_relu(64, 64, bias=True), nn.Conv2d(64, out, 3, padding=1))
            for classes in TASK_CLASSES for out in [*BRANCHES.values(), classes])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared = self.shared(x)
        return [branch(shared) for branch in self.branches]


def export(path: Path) -> onnx.ModelProto:
    """RPN + CenterHead exported in eval mode (opset 17, BN folded into convs as the bundle's exports are)."""
    model = nn.Sequential(RPN(), CenterHead()).eval()
    torch.onnx.export(model, (torch.randn(1, IN_CHANNELS, BEV, BEV),), str(path), opset_version=17, dynamo=False)
    return shape_inference.infer_shapes(onnx.load(str(path)))


def conv_shapes(model: onnx.ModelProto) -> Counter:
    """(Cin, H_in, Cout, H_out) of every Conv / ConvTranspose of an ONNX graph."""
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    return Counter((shapes[n.input[0]][1], shapes[n.input[0]][2], shapes[n.output[0]][1], shapes[n.output[0]][2])
                   for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose"))


def engine_conv_shapes(log: Path) -> Counter:
    """The same shapes from trtexec's engine layer information (horizontally fused convolutions counted once each)."""
    found: Counter = Counter()
    pattern = re.compile(r"^Layer\((?:CaskConvolution|GemmDeconvolution)\): (.*?), Tactic.*?"
                         r"\[Half\(1,(\d+),(\d+),\d+\)\] -> .*\[Half\(1,(\d+),(\d+),\d+\)\]$")
    for line in log.read_text(errors="replace").splitlines():
        match = pattern.match(line)
        if match:
            convs = match.group(1).count("||") + 1  # "Conv_62 + Relu_63 || Conv_65 + Relu_66 || ..."
            cin, hin, cout, hout = map(int, match.groups()[1:])
            found[(cin, hin, cout // convs, hout)] += convs
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trtexec-log", type=Path, help="CUDA-CenterPoint/model/rpn_centerhead_sim.8503.log")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = export(Path(tmp) / "rpn_centerhead.onnx")
    ours = conv_shapes(model)
    check = None
    if args.trtexec_log:
        theirs = engine_conv_shapes(args.trtexec_log)
        check = {"log": args.trtexec_log.name, "convolutions": sum(theirs.values()), "identical": theirs == ours,
                 "only_ours": sorted(map(list, (ours - theirs).elements())),
                 "only_engine": sorted(map(list, (theirs - ours).elements()))}
        if theirs != ours:
            raise SystemExit(f"the built network differs from the engine in {args.trtexec_log}: {check}")
    stages = {}
    for precision, measured in MEASURED_MS.items():
        projection = roofline(model, precision)
        projected = projection["projected_ms"]["gpu"]
        stages[precision] = {"projected_ms": projected, "measured_ms": measured, "measured_over_projected":
                             measured / projected, "gflops": projection["gflops"],
                             "fused_layers": projection["fused_layers"], "layers": len(projection["layers"])}
    result = {"stage": "CUDA-CenterPoint RPN + CenterHead, 1 x 256 x 180 x 180 BEV", "measured_source": SOURCE,
              "convolutions": sum(ours.values()), "engine_check": check, "stages": stages,
              "assumptions": list(ASSUMPTIONS)}
    save("roofline_check", result)
    write_section("roofline_check", markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    """The benchmarks/README.md section."""
    rows = "\n".join(f"| {p} | {s['gflops']:.1f} | {s['projected_ms']:.2f} | {s['measured_ms']:.1f} | "
                     f"{s['measured_over_projected']:.2f}x |" for p, s in result["stages"].items())
    check = result["engine_check"]
    verified = (f"Checked against the engine NVIDIA built (`{check['log']}`): all {check['convolutions']} convolutions "
                "have the same input/output shapes." if check and check["identical"] else
                "Not checked against NVIDIA's engine log in this run (pass `--trtexec-log`).")
    return f"""## Roofline vs a measured Orin stage (`roofline_check`)

The export's Orin projection (`bevfusion_ext/export/roofline.py`: per layer max(FLOPs / peak, bytes / bandwidth) at
the layer's precision, pointwise layers fused, fixed per-kernel cost) of {result['stage']}
({result['convolutions']} convolutions), against NVIDIA's measurement ({result['measured_source']}).
{verified}

| precision | GFLOPs | projected ms (GPU) | measured ms | measured / projected |
|---|---|---|---|---|
{rows}

The projection is a lower bound: the measured stage takes this factor longer. One stage on a DRIVE Orin (not the
Jetson AGX Orin whose peaks the projection uses) cannot calibrate the tool; read projected bundle latencies with this
factor in mind.
"""


if __name__ == "__main__":
    main()
