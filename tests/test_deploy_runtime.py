"""The deploy runtime on a tiny bundle written by tools/export_engine.py: its frames equal the PyTorch model's, the BEV
pool is planned once per calibration, the pipelined runner equals the sequential one, lib/python runs without the
training code, the bundle's scripts are generated and parse, and every bad input is one clear line."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, run_tool, warm_bn

from bevfusion_ext.compression import atomic_save
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.deploy import (
    BackendUnavailable,
    BundleError,
    Frame,
    FrameError,
    Prediction,
    Runtime,
    TensorRTBackend,
)
from bevfusion_ext.deploy.bench import summarize
from bevfusion_ext.deploy.kernels import BEVPoolPlan, bev_pool, gen_dx_bx, select_boxes
from bevfusion_ext.deploy.streams import PipelinedRunner, run_sequential
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.runner.rebuild import load_compressed_model

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
DEPLOY = [sys.executable, "-m", "bevfusion_ext.deploy"]
FORBIDDEN = ("bevfusion_ext.models", "bevfusion_ext.runner", "bevfusion_ext.compression", "bevfusion_ext.export",
             "mmcv", "mmdet", "mmdet3d")


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    dataset = SyntheticBEVDataset(4, seed=0, split="val")
    return [dataset[i] for i in range(4)]


@pytest.fixture(scope="module")
def bundle(samples: list[dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A seeded tiny model with warmed BatchNorm statistics, saved as training saves it and exported by the CLI."""
    torch.manual_seed(0)
    model = warm_bn(build_model(reference_config("tiny")), [collate(samples[:2]), collate(samples[2:])])
    root = tmp_path_factory.mktemp("deploy")
    checkpoint, out = root / "tiny.pth", root / "bundle"
    atomic_save({"meta": {}, "state_dict": model.state_dict()}, checkpoint)
    proc = run_tool([sys.executable, "tools/export_engine.py", TINY, str(checkpoint), "--out", str(out),
                     "--allow-dense"])
    assert proc.returncode == 0, proc.stderr
    return out, checkpoint


@pytest.fixture(scope="module")
def model(bundle: tuple) -> torch.nn.Module:
    return load_compressed_model(str(ROOT / TINY), str(bundle[1]))[0]


@pytest.fixture(scope="module")
def runtime(bundle: tuple, one_thread: None) -> Runtime:
    return Runtime(bundle[0], threads=1)


def assert_same_prediction(expected: dict, actual: dict, atol: float = 1e-5) -> None:
    """Equal labels; boxes (metres), scores and mask probabilities within atol."""
    assert set(actual) == set(expected)
    assert torch.equal(actual["labels_3d"], expected["labels_3d"])
    for key in ("boxes_3d", "scores_3d", "masks_bev"):
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def shifted(sample: dict, metres: float) -> dict:
    """The sample with every camera moved `metres` along ego x (a new calibration)."""
    moved = dict(sample)
    moved["camera2lidar"] = sample["camera2lidar"].clone()
    moved["camera2lidar"][:, 0, 3] += metres
    return moved


def test_runtime_equals_the_pytorch_model_frame_by_frame(runtime: Runtime, model: torch.nn.Module,
                                                         samples: list[dict]) -> None:
    for sample in [*samples, shifted(samples[0], 0.5)]:
        with torch.no_grad():
            expected = model(return_loss=False, **collate([sample]))[0]
        prediction = runtime.run(Frame.from_sample(sample))
        assert len(prediction.scores_3d) == 32 and prediction.masks_bev.shape == (2, 64, 64)
        assert_same_prediction(expected, prediction.result())


def test_bev_pool_is_planned_once_per_calibration_and_equals_the_scatter_pool(runtime: Runtime,
                                                                             samples: list[dict]) -> None:
    frame = Frame.from_sample(samples[0])
    plan = runtime.plan(frame.camera_intrinsics, frame.camera2lidar)
    assert runtime.plan(frame.camera_intrinsics.clone(), frame.camera2lidar.clone()) is plan
    moved = shifted(samples[0], 0.5)["camera2lidar"]
    replanned = runtime.plan(frame.camera_intrinsics, moved)
    assert replanned is not plan and not torch.equal(replanned.cell, plan.cell)

    g = torch.Generator().manual_seed(0)
    bounds = ([-4.0, 4.0, 1.0], [-3.0, 3.0, 0.5], [-1.0, 1.0, 2.0])
    geom = torch.rand(1, 2, 5, 3, 4, 3, generator=g) * 10 - 5  # some points fall outside the grid
    depth = torch.rand(2, 5, 3, 4, generator=g).softmax(1)
    context = torch.randn(2, 6, 3, 4, generator=g)
    lifted = (depth.unsqueeze(1) * context.unsqueeze(2)).view(1, 2, 6, 5, 3, 4).permute(0, 1, 3, 4, 5, 2)
    expected = bev_pool(geom, lifted, *gen_dx_bx(*bounds))
    pooled = BEVPoolPlan.from_geometry(geom, *gen_dx_bx(*bounds))(depth, context)
    assert pooled.shape == expected.shape == (1, 6, 12, 8)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("depth", [1, 3])
def test_pipelined_runner_gives_the_sequential_outputs_in_order(runtime: Runtime, samples: list[dict],
                                                                depth: int) -> None:
    frames = [Frame.from_sample(s, name=f"f{i}") for i, s in enumerate([*samples, shifted(samples[1], 0.3)])]
    sequential = list(run_sequential(runtime, frames))
    pipelined = list(PipelinedRunner(runtime, depth).run(frames))
    assert [t.name for t in pipelined] == [f"f{i}" for i in range(len(frames))]
    for a, b in zip(sequential, pipelined, strict=True):
        assert_same_prediction(a.prediction.result(), b.prediction.result(), atol=0.0)
        assert b.latency_s > 0


def test_pipelined_runner_raises_the_failing_frames_error(runtime: Runtime, samples: list[dict]) -> None:
    bad = Frame.from_sample(samples[1], name="three_cameras")
    bad.img, bad.camera_intrinsics, bad.camera2lidar = bad.img[:3], bad.camera_intrinsics[:3], bad.camera2lidar[:3]
    frames = [Frame.from_sample(samples[0]), bad, Frame.from_sample(samples[2])]
    with pytest.raises(FrameError, match=r"frame three_cameras has img \[3, 3, 96, 160\] \(3 camera images\)"):
        list(PipelinedRunner(runtime, 2).run(frames))


def test_the_bundle_runs_alone_from_lib_python(bundle: tuple, tmp_path: Path) -> None:
    out = bundle[0]
    assert (out / "docs/API.md").read_text().startswith("# The deployed model's runtime")
    assert sorted(p.name for p in (out / "data/sample_data").iterdir()) == [f"frame_00{i}.npz" for i in range(3)]
    probe = ("import json, sys; from bevfusion_ext.deploy import Runtime, load_frames; import bevfusion_ext; "
             f"p = Runtime(sys.argv[1]).run(load_frames([sys.argv[1] + '/data/sample_data'])[0]); "
             f"print(json.dumps([bevfusion_ext.__file__, [m for m in sys.modules if m.startswith({FORBIDDEN})], "
             "len(p.scores_3d)]))")
    env = {**os.environ, "PYTHONPATH": str(out / "lib/python")}
    proc = subprocess.run([sys.executable, "-c", probe, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    location, loaded, boxes = json.loads(proc.stdout.splitlines()[-1])
    assert Path(location).is_relative_to(out / "lib/python") and loaded == [] and boxes == 32
    env = {**os.environ, "PYTHON": sys.executable, "BACKEND": "onnxruntime"}
    proc = subprocess.run(["bash", str(out / "scripts/run_inference.sh"), "--out", str(tmp_path / "pred")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "backend onnxruntime (requested); flavour fp32" in proc.stdout
    assert sum(line.startswith("frame_00") and ": 32 boxes" in line for line in proc.stdout.splitlines()) == 3
    saved = np.load(tmp_path / "pred" / "frame_000.pred.npz")
    assert saved["boxes_3d"].shape == (32, 7) and saved["masks_bev"].shape == (2, 64, 64)


def test_benchmark_script_times_frames_and_summarizes_trtexec_and_power(bundle: tuple, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(bundle[0], out)
    script = (out / "scripts/benchmark.sh").read_text()
    assert script.index("bench fuser.gpu_fp16") < script.index("-m bevfusion_ext.deploy benchmark . --backend tensorrt")
    assert "\nframes fp32\n" in script and "frames qdq" not in script
    assert script.rstrip().endswith("-m bevfusion_ext.deploy summarize .")
    scripts = sorted((out / "scripts").glob("*.sh"))
    for path in scripts:
        subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout

    proc = subprocess.run([*DEPLOY, "benchmark", str(out), "--backend", "onnxruntime", "--iterations", "3",
                           "--warmup", "1", "--threads", "1"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    frames = json.loads((out / "results/frames.fp32.json").read_text())
    assert [m["mode"] for m in frames["modes"]] == ["sequential", "pipelined"]
    assert all(m["frames"] == 3 and m["fps"] > 0 and m["p99_ms"] >= m["p50_ms"] > 0 for m in frames["modes"])

    # trtexec --exportTimes and tegrastats in their own formats, as the Orin writes them
    times = [{"count": 3}] + [{"startComputeMs": i, "endComputeMs": i + c, "computeMs": c, "latencyMs": c + 0.5}
                              for i, c in enumerate([1.0, 3.0, 2.0])]
    (out / "results/fuser.gpu_fp16.times.json").write_text(json.dumps(times))
    (out / "logs").mkdir()
    (out / "logs/tegrastats.log").write_text(
        "RAM 2448/62780MB (lfb 14767x4MB) CPU [1%@729,0%@729] GR3D_FREQ 0%@[305,305] VDD_GPU_SOC 3000mW/3000mW "
        "VDD_CPU_CV 400mW/400mW VIN_SYS_5V0 3300mW/3300mW\n"
        "RAM 2450/62780MB (lfb 14767x4MB) CPU [9%@1984,3%@1984] GR3D_FREQ 97%@[1300,1300] VDD_GPU_SOC 9000mW/6000mW "
        "VDD_CPU_CV 600mW/500mW VIN_SYS_5V0 3500mW/3400mW\n")
    text = summarize(out)
    assert "| fp32 | onnxruntime | sequential | 3 |" in text and "| fp32 | onnxruntime | pipelined | 3 |" in text
    assert "| fuser.gpu_fp16 | 3 | 2.000 | 2.980 | 2.500 |" in text
    assert "| VDD_GPU_SOC | 2 | 6000 | 9000 |" in text and "| VIN_SYS_5V0 | 2 | 3400 | 3500 |" in text
    assert (out / "results/benchmark.md").read_text() == text


def test_circle_nms_and_mask_thresholds() -> None:
    boxes = torch.zeros(4, 7)
    boxes[:, 0] = torch.tensor([0.0, 0.3, 0.3, 5.0])
    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([0, 0, 1, 0])
    kept = select_boxes(boxes, scores, labels, score_threshold=0.05, max_num=10, nms_radius=0.5)
    assert kept[1].tolist() == pytest.approx([0.9, 0.7, 0.1])  # the second car box lies within 0.5 m of the first
    assert select_boxes(boxes, scores, labels, score_threshold=0.5, max_num=2)[1].tolist() == pytest.approx([0.9, 0.8])
    masks = Prediction(boxes, scores, labels, torch.tensor([[[0.2, 0.6]], [[0.2, 0.6]]])).masks([0.1, 0.7])
    assert masks.tolist() == [[[True, True]], [[False, False]]]


def frame_file(path: Path, sample: dict, cameras: int) -> Path:
    Frame(sample["img"][:cameras], sample["points"], sample["camera_intrinsics"][:cameras],
          sample["camera2lidar"][:cameras], "bad").save(path)
    return path


def test_bad_bundles_and_frames_are_one_line_each(bundle: tuple, samples: list[dict], tmp_path: Path) -> None:
    out = bundle[0]
    no_fuser = tmp_path / "no_fuser"
    shutil.copytree(out, no_fuser, ignore=shutil.ignore_patterns("fuser.onnx"))
    cases = {
        "missing part": ([str(no_fuser)], f"{no_fuser}/models/fuser/fuser.onnx is missing (report.json lists it for "
                                          "part fuser)"),
        "wrong camera count": ([str(out), str(frame_file(tmp_path / "three.npz", samples[0], 3))],
                               "frame three has img [3, 3, 96, 160] (3 camera images), but the bundle's "
                               "camera.backbone takes img [4, 3, 96, 160] (4 cameras)"),
        "not a bundle": ([str(tmp_path)], f"{tmp_path}/report.json is missing: {tmp_path} is not a deploy bundle"),
        "no INT8 flavour": ([str(out), "--flavour", "qdq"], "the bundle has no qdq flavour (its checkpoint has no "
                                                            "quantizers)"),
        "engines not built": ([str(out), "--backend", "tensorrt"], f"{out}/engines/camera.backbone.gpu_fp16.engine "
                                                                   "is missing: build it on the Orin"),
    }
    for case, (args, message) in cases.items():
        proc = subprocess.run([*DEPLOY, "infer", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, (case, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, case
    report = json.loads((out / "report.json").read_text())
    del report["parts"]["fuser"]
    (no_fuser / "report.json").write_text(json.dumps(report))
    with pytest.raises(BundleError, match="has no part fuser: the runtime needs .*re-export without --parts"):
        Runtime(no_fuser)


def test_tensorrt_backend_says_why_it_cannot_run_here(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here: the guard under test is for machines without it")
    with pytest.raises(BackendUnavailable, match="tensorrt is not importable .*use the onnxruntime backend here"):
        TensorRTBackend(tmp_path / "part.engine")
