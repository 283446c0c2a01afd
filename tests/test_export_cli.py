"""tools/export_engine.py end to end on a tiny checkpoint: the deploy bundle's layout and report, --force, and every bad
input as one `error:` line with exit status 2 and nothing written; a failing check publishes nothing either."""

import json
import os
import sys
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from helpers import ROOT, TINY, run_tool
from mmcv import Config

from bevfusion_ext.compression import atomic_save
from bevfusion_ext.export import parity
from bevfusion_ext.export.bundle import config_yaml
from bevfusion_ext.export.dla_rules import is_layer
from bevfusion_ext.export.parts import PARTS
from bevfusion_ext.export.pipeline import ExportCheckFailed, ExportOptions, run
from bevfusion_ext.models import build_model, reference_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
FULL = "configs/synthetic/multitask/full.yaml"
EXPORT = [sys.executable, "tools/export_engine.py"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built tiny model saved the way training saves it, without compression state."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    atomic_save({"meta": {}, "state_dict": build_model(reference_config("tiny")).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("export") / "deploy"
    return out, run_tool([*EXPORT, TINY, str(checkpoint), "--out", str(out), "--allow-dense"])


def test_cli_writes_the_seed_bundle_layout(bundle: tuple) -> None:
    out, proc = bundle
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    for part in PARTS:
        assert (out / "models" / part / f"{part}.onnx").is_file(), part
    for name in ("models/config.yaml", "models/classes.json", "README.md", "report.md", "report.json"):
        assert (out / name).is_file(), name
    for script in ("build_engines.sh", "benchmark.sh", "tegrastats_power.sh"):
        assert os.access(out / "scripts" / script, os.X_OK), script
    assert json.loads((out / "models" / "classes.json").read_text())["object"] == ["car", "pedestrian", "barrier"]
    assert "--onnx=models/fuser/fuser.onnx --fp16" in (out / "scripts" / "build_engines.sh").read_text()
    assert "JetPack 6" in (out / "README.md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["deploy"]  # no staging directory left behind


def test_report_has_parity_placement_for_every_node_and_a_labelled_projection(bundle: tuple) -> None:
    out, _ = bundle
    report = json.loads((out / "report.json").read_text())
    assert list(report["parts"]) == list(PARTS)
    for name, entry in report["parts"].items():
        assert all(p["passed"] for p in entry["parity"].values()), name
        layers = [n.name for n in onnx.load(str(out / entry["files"]["onnx"])).graph.node if is_layer(n)]
        assert [n["name"] for n in entry["placement"]["nodes"]] == layers, name
        assert entry["roofline"]["fp16"]["label"] == "projection" and entry["params"] > 0
        assert entry["fp16_range"]["tensors_checked"] > 0 and entry["fp16_range"]["overflow"] == [], name
    assert report["bev_pool"]["parity"]["fp32"]["passed"] and report["bev_pool"]["parity"]["fp32"]["ort_threads"] == 2
    assert {k["name"] for k in report["kernels"]} == {
        "camera.depth_image",
        "camera.bev_pool",
        "lidar.voxelize",
        "lidar.sparse_encoder",
        "head.object.decode",
    }
    assert report["source"]["quantized"] is False and "QAT" in report["source"]["quantization"]
    text = (out / "report.md").read_text()
    for heading in ("## Parts", "## Parity", "## FP16 range", "## DLA / GPU placement", "## Projected Orin latency"):
        assert heading in text
    assert "Projection, not a measurement" in text and "not requested (--build)" in text
    cited = [n for e in report["parts"].values() for n in e["placement"]["nodes"] if not n["on_dla"]]
    assert cited and all(n["source"] and n["source"] in text for n in cited)  # every GPU verdict names its NVIDIA rule


def test_force_replaces_an_existing_bundle(bundle: tuple, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    proc = run_tool(
        [
            *EXPORT,
            TINY,
            str(checkpoint),
            "--out",
            str(out),
            "--allow-dense",
            "--force",
            "--parts",
            "head.map",
            "--build",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "models").iterdir()) == ["classes.json", "config.yaml", "head.map"]
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]
    assert "TensorRT build skipped: tensorrt not importable" in proc.stdout


BAD_INPUTS = {
    "no compression state": ([TINY, "{ckpt}"], "carries no compression state"),
    "config mismatch": ([FULL, "{ckpt}", "--allow-dense"], "does not fit the model built from the config"),
    "unknown part": ([TINY, "{ckpt}", "--allow-dense", "--parts", "fuser", "head.bbox"], "unknown part(s) head.bbox"),
    "missing checkpoint": ([TINY, "{missing}", "--allow-dense"], "no such file"),
    "existing output": ([TINY, "{ckpt}", "--allow-dense"], "already exists; pass --force"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_and_writes_nothing(case: str, checkpoint: Path, tmp_path: Path) -> None:
    args, message = BAD_INPUTS[case]
    out = tmp_path / "deploy"
    if case == "existing output":
        out.mkdir()
    args = [a.format(ckpt=checkpoint, missing=tmp_path / "missing.pth") for a in args]
    proc = run_tool([*EXPORT, *args, "--out", str(out)])
    assert proc.returncode == 2, proc.stderr
    assert "error: " in proc.stderr and message in proc.stderr and "Traceback" not in proc.stderr
    if case == "no compression state":
        assert "--allow-dense" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["deploy"] if case == "existing output" else [])
    assert not out.exists() or not any(out.iterdir())


def test_failed_check_publishes_nothing(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(parity.TOLERANCES, "fp32", parity.Tolerance(-1.0, -1.0, "nothing passes"))
    options = ExportOptions(
        config=str(ROOT / TINY),
        checkpoint=str(checkpoint),
        out=tmp_path / "deploy",
        parts=["head.map"],
        allow_dense=True,
    )
    with pytest.raises(ExportCheckFailed, match=r"head.map \[fp32\] map_logits"):
        run(options, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_bundle_config_is_plain_yaml_also_for_a_config_built_in_python() -> None:
    cfg = Config(dict(model=dict(xbound=(-54.0, 54.0, 0.6), heads=dict(map=None))))  # no file name, tuples
    assert yaml.safe_load(config_yaml(cfg)) == {"model": {"xbound": [-54.0, 54.0, 0.6], "heads": {"map": None}}}
