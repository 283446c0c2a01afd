"""ONNX parts of the tiny model: every part reproduces the model, exports (opset 17, onnxsim), passes onnxruntime parity
and gets a DLA/GPU verdict per node; the scatter_add BEV pool alone in onnxruntime at 2 threads; TransFusion's top-k
alignment; and the INT8 flavours (Q/DQ, Q/DQ-free + calibration cache + FP16 list) of a quantized model."""

import json
import sys
from pathlib import Path

import onnx
import pytest
import torch
from helpers import ROOT, TINY, run_tool, warm_bn

from bevfusion_ext.compression import atomic_save
from bevfusion_ext.compression.quantization import QuantSpec, calibrate, quantize_model, quantizer_state
from bevfusion_ext.compression.quantization.folding import fold_batchnorms
from bevfusion_ext.compression.state import empty_state
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.export import calib_tag, read_calib_cache
from bevfusion_ext.export.dla_rules import attr, is_layer
from bevfusion_ext.export.parity import ORT_THREADS, TOLERANCES, compare, run_onnx
from bevfusion_ext.export.parts import (
    BEV_POOL,
    OPSET,
    PARTS,
    capture,
    export_onnx,
    first_sample,
    random_inputs,
)
from bevfusion_ext.export.pipeline import ExportOptions, check_failures, export_bundle, export_part
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.runner.train import prepare_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
TAG = calib_tag("10.3")


@pytest.fixture(scope="module")
def batches() -> list[dict]:
    dataset = SyntheticBEVDataset(4, seed=0, split="val")
    return [collate([dataset[i], dataset[i + 1]]) for i in (0, 2)]



@pytest.fixture(scope="module")
def float_model(batches: list[dict]) -> tuple[torch.nn.Module, dict]:
    """The tiny model with folded BatchNorms and its captured activations on one sample."""
    torch.manual_seed(0)
    model = warm_bn(build_model(reference_config("tiny")), batches)
    fold_batchnorms(model)
    return model, capture(model, first_sample(batches[0]))


@pytest.fixture(scope="module")
def entries(float_model: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    model, acts = float_model
    root = tmp_path_factory.mktemp("parts")
    return root, {name: export_part(model, part, acts, root, TAG, seed=0) for name, part in PARTS.items()}


def layer_names(path: Path) -> list[str]:
    return [node.name for node in onnx.load(str(path)).graph.node if is_layer(node)]


@pytest.mark.parametrize("name", list(PARTS))
def test_part_exports_static_and_matches_onnxruntime(name: str, entries: tuple) -> None:
    root, by_name = entries
    entry = by_name[name]
    graph = onnx.load(str(root / entry["files"]["onnx"]))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version == OPSET
    for value in [*graph.graph.input, *graph.graph.output]:
        assert all(d.dim_value > 0 for d in value.type.tensor_type.shape.dim), value.name  # static shapes
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]  # folded before export
    assert entry["fidelity_max_abs"] <= 1e-5
    fp32 = entry["parity"]["fp32"]
    assert fp32["passed"] and fp32["ort_threads"] == 2, fp32
    assert list(entry["parity"]) == ["fp32"] and list(entry["files"]) == ["onnx"]  # no quantizers: FP32 only
    assert [n["name"] for n in entry["placement"]["nodes"]] == layer_names(root / entry["files"]["onnx"])
    assert all(n["reason"] == "OK" if n["on_dla"] else n["reason"] != "OK" for n in entry["placement"]["nodes"])
    assert entry["roofline"]["fp16"]["label"] == "projection" and entry["gflops"] > 0
    assert set(entry["commands"]) == {"gpu_fp16"}


def test_dla_parts_fit_and_strict_dla_names_a_part_that_does_not(entries: tuple) -> None:
    _, by_name = entries
    for name in ("camera.vtransform", "lidar.backbone", "fuser"):
        assert by_name[name]["placement"]["plan"]["fits_dla_entirely"], name
    report = {"parts": {"camera.backbone": {**by_name["camera.backbone"], "target": "dla"}}, "bev_pool": None}
    assert check_failures(report, strict_dla=False) == []
    [line] = check_failures(report, strict_dla=True)
    assert "camera.backbone is meant for the DLA" in line and "LayerNormalization" in line


def test_parity_failure_names_part_flavour_and_output(entries: tuple) -> None:
    _, by_name = entries
    broken = {**by_name["fuser"], "parity": {"fp32": {**by_name["fuser"]["parity"]["fp32"]}}}
    broken["parity"]["fp32"]["outputs"] = {
        "bev_features": {"max_abs": 1.0, "mean_abs": 0.1, "scale": 1.0, "passed": False}
    }
    [line] = check_failures({"parts": {"fuser": broken}, "bev_pool": None}, strict_dla=False)
    assert line.startswith("fuser [fp32] bev_features: max_abs=1") and "tolerance max 0.0001" in line


def test_qdq_parity_allows_rare_far_elements_and_fp32_none() -> None:
    """A Q/DQ rounding flip cascade leaves a few far-off elements (real fuser + SECOND decoder: max 0.2 x max|ref|);
    the qdq bound takes at most TOLERANCES['qdq'].outliers of them, the float flavours not one."""
    reference = torch.linspace(-4.0, 4.0, 10_000)
    few, many = reference.clone(), reference.clone()
    few[:5] += 1.2  # 5e-4 of the elements at 0.3 x max|ref|
    many[:50] += 1.2  # 5e-3
    assert compare(reference, few.numpy(), TOLERANCES["qdq"])["passed"]
    assert compare(reference, few.numpy(), TOLERANCES["qdq"])["outliers"] == 5e-4
    assert not compare(reference, many.numpy(), TOLERANCES["qdq"])["passed"]
    assert not compare(reference, few.numpy(), TOLERANCES["fp32"])["passed"]
    shifted = (reference + 0.05 * 4.0).numpy()  # every element off by 5e-2 of max|ref|: a mean error, not a flip
    assert not compare(reference, shifted, TOLERANCES["qdq"])["passed"]


def test_bev_pool_scatter_add_matches_pytorch_in_onnxruntime_at_2_threads(float_model: tuple, tmp_path: Path) -> None:
    model, acts = float_model
    pool = BEV_POOL.build(model).eval()
    examples = BEV_POOL.inputs(model, acts)
    with torch.no_grad():
        torch.testing.assert_close(pool(*examples.values()), BEV_POOL.reference(model, acts)[0])
    path = tmp_path / "bev_pool.onnx"
    graph = export_onnx(pool, examples, BEV_POOL.outputs, path)
    scatters = [n for n in graph.graph.node if n.op_type.startswith("Scatter")]
    assert [(n.op_type, attr(n, "reduction")) for n in scatters] == [("ScatterElements", "add")]
    inputs = random_inputs(examples, seed=3)
    with torch.no_grad():
        expected = pool(*inputs.values())
    assert ORT_THREADS == 2
    for _ in range(3):  # ScatterND(add) would be nondeterministic with duplicate indices at > 1 thread
        result = compare(expected, run_onnx(path, inputs)["camera_bev_pooled"], TOLERANCES["fp32"])
        assert result["passed"] and result["max_abs"] < 1e-5, result


def test_object_head_outputs_follow_imposed_proposals(float_model: tuple) -> None:
    """Aligning on onnxruntime's picks: reversed proposals give the reversed per-query outputs."""
    model, acts = float_model
    part = PARTS["head.object"]
    head = part.build(model).eval()
    bev = part.inputs(model, acts)["bev_features"]
    with torch.no_grad():
        free = dict(zip(part.outputs, head(bev), strict=True))
        flipped = dict(
            zip(part.outputs, head.aligned(bev, free["query_labels"].flip(1), free["query_cells"].flip(1)), strict=True)
        )
    for name in ("center", "heatmap", "query_scores", "query_labels", "query_cells"):
        torch.testing.assert_close(flipped[name], free[name].flip(-1), atol=1e-4, rtol=1e-4)
    assert "proposals" not in head.head.__dict__  # the method is restored


@pytest.fixture(scope="module")
def quantized(batches: list[dict]) -> tuple[torch.nn.Module, dict]:
    """The tiny model quantized (ModelOpt, BN folded) and max-calibrated on two synthetic batches."""
    torch.manual_seed(0)
    model = warm_bn(build_model(reference_config("tiny")), batches)
    spec = QuantSpec(fold_bn=True)
    quantize_model(model, spec)
    calibrate(model, spec, batches, lambda m, batch: m(return_loss=False, **batch))
    return model, capture(model, first_sample(batches[0]))


@pytest.mark.parametrize("name", ["fuser", "head.object"])
def test_quantized_part_has_int8_flavours_with_parity_cache_and_dla_plan(
    name: str, quantized: tuple, tmp_path: Path
) -> None:
    model, acts = quantized
    entry = export_part(model, PARTS[name], acts, tmp_path, TAG, seed=0)
    files = {key: tmp_path / rel for key, rel in entry["files"].items()}
    assert set(files) == {"onnx", "qdq", "noqdq", "cache", "fp16_layers"} and all(p.exists() for p in files.values())
    assert {f: p["passed"] for f, p in entry["parity"].items()} == {"fp32": True, "qdq": True, "noqdq": True}
    ops = {n.op_type for n in onnx.load(str(files["qdq"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    noqdq = onnx.load(str(files["noqdq"]))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in noqdq.graph.node}
    assert files["cache"].read_text().splitlines()[0] == "TRT-100300-EntropyCalibration2"
    scales = read_calib_cache(files["cache"])
    assert scales and all(s > 0 for s in scales.values())
    assert files["fp16_layers"].read_text().split() == entry["fp16_layers"]
    placement = entry["placement"]
    assert placement["precision"] == "int8" and [n["name"] for n in placement["nodes"]] == layer_names(files["noqdq"])
    assert set(entry["roofline"]) == {"fp16", "int8"}
    if name == "fuser":  # conv-only, meant for the DLA: fits, so every DLA target is emitted
        assert placement["plan"]["fits_dla_entirely"]
        assert set(entry["commands"]) == {"gpu_fp16", "gpu_int8", "dla0", "dla1", "dla_standalone"}
        assert f"--calib={entry['files']['cache']}" in entry["commands"]["dla0"]
    else:
        assert set(entry["commands"]) == {"gpu_fp16", "gpu_int8"}


def test_quantized_bundle_lists_int8_and_dla_targets(quantized: tuple, batches: list[dict], tmp_path: Path) -> None:
    model, _ = quantized
    cfg, _ = prepare_config(str(ROOT / TINY), [])
    options = ExportOptions(config=TINY, checkpoint="(in memory)", out=tmp_path)
    source = {"config": TINY, "checkpoint": "(in memory)", "pruning_events": 0}
    report = export_bundle(
        model, cfg, batches[0], tmp_path, options, source, ["camera.vtransform"], log=lambda line: None
    )
    assert check_failures(report, strict_dla=True) == []
    assert report["source"]["quantized"] and "modelopt" in report["source"]["quantization"]
    script = (tmp_path / "scripts" / "build_engines.sh").read_text()
    for target in ("gpu_fp16", "gpu_int8", "dla0", "dla1", "dla_standalone"):
        assert f"build camera.vtransform.{target} " in script
    assert "`dla_standalone`" in (tmp_path / "README.md").read_text()
    assert "| camera.vtransform | DLA |" in (tmp_path / "report.md").read_text()


def test_quantized_checkpoint_rebuilds_and_exports_through_the_cli(quantized: tuple, tmp_path: Path) -> None:
    """Config + QAT/PTQ checkpoint -> the quantized model (restore_quantizers via the rebuild) -> INT8 flavours.

    --allow-dense because this checkpoint is quantized but not pruned, and the rebuild's compression check counts
    pruning only.
    """
    model, _ = quantized
    checkpoint = tmp_path / "quantized.pth"
    state = {**empty_state(), "quantization": quantizer_state(model)}
    atomic_save({"meta": {"compression": state}, "state_dict": model.state_dict()}, checkpoint)
    out = tmp_path / "deploy"
    proc = run_tool(
        [
            sys.executable,
            "tools/export_engine.py",
            TINY,
            str(checkpoint),
            "--out",
            str(out),
            "--parts",
            "fuser",
            "--strict-dla",
            "--allow-dense",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["quantized"] and "folded at quantization" in report["source"]["bn"]
    assert set(report["parts"]["fuser"]["parity"]) == {"fp32", "qdq", "noqdq"}
    assert sorted(p.name for p in (out / "models" / "fuser").iterdir()) == [
        "fuser.cache",
        "fuser.fp16_layers.txt",
        "fuser.noqdq.onnx",
        "fuser.onnx",
        "fuser.qdq.onnx",
    ]
