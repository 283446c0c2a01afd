"""The deploy bundle's layout (the seed's `deploy/`), its Orin-side README, and an all-or-nothing publish: the bundle
is assembled in a hidden directory next to `--out` and renamed into place only when everything succeeded.

Before publishing, the runtime goes in (`install_runtime`): lib/python (bevfusion_ext.deploy alone),
scripts/run_inference.sh, docs/API.md, a few validation frames in data/sample_data and the whole-frame steps of
scripts/benchmark.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..deploy.runtime import Frame
from ..deploy.spec import unsupported
from ..runner.builder import build_dataset
from ..runner.train import prepare_config

FILES = {  # artefact -> file name pattern inside models/<part>/
    "onnx": "{part}.onnx",
    "qdq": "{part}.qdq.onnx",
    "noqdq": "{part}.noqdq.onnx",
    "cache": "{part}.cache",
    "fp16_layers": "{part}.fp16_layers.txt",
}
LAYOUT = {
    "onnx": "FP32 ONNX (GPU FP16 engine)",
    "qdq": "Q/DQ ONNX (GPU INT8, explicit quantization)",
    "noqdq": "Q/DQ-free ONNX (DLA INT8, implicit quantization)",
    "cache": "TensorRT calibration cache from the QAT/PTQ amax values",
    "fp16_layers": "layers pinned to FP16 (--layerPrecisions)",
}
PIPELINE = (
    "camera: depth_image (kernel) -> camera.backbone -> bev_pool (kernel) -> camera.vtransform",
    "lidar: voxelize (kernel) -> lidar.backbone (spconv in BEVFusion)",
    "fuser (camera_bev, lidar_bev) -> head.object -> decode (post-processing); fuser -> head.map -> sigmoid",
)


def part_files(part: str) -> dict[str, str]:
    """Bundle-relative paths of one part's artefacts."""
    return {key: f"models/{part}/{pattern.format(part=part)}" for key, pattern in FILES.items()}


def out_problem(out: Path, force: bool) -> str | None:
    """Why `out` cannot receive a bundle (exists without --force, or is not a directory), else None."""
    if out.exists() and not force:
        return f"output directory {out} already exists; pass --force to replace it or choose another --out"
    if out.exists() and not out.is_dir():
        return f"--out {out} is an existing file, not a directory; choose another --out"
    return None


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A fresh directory next to `out`, renamed to `out` if the block succeeds; on any failure nothing is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        install_runtime(tmp)
        _publish(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished bundle into place; an existing one (--force) is moved aside first, then deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not force:
        raise FileExistsError(f"output directory {out} appeared during the export; nothing was replaced")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old)


RUNTIME_PACKAGE = Path(__file__).resolve().parents[1] / "deploy"
SAMPLE_FRAMES = 3
RUN_INFERENCE = [
    "#!/usr/bin/env bash",
    "# Run the deployed model on frames (default: data/sample_data), one line of boxes and masks per frame.",
    "# BACKEND=auto|onnxruntime|tensorrt; other arguments go to `python3 -m bevfusion_ext.deploy infer` (--flavour",
    "# fp32|qdq|noqdq, --out DIR, frame files or directories). Runs from anywhere; docs/API.md has the Python API.",
    "set -euo pipefail",
    'BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"',
    'export PYTHONPATH="$BUNDLE/lib/python${PYTHONPATH:+:$PYTHONPATH}"',
    'exec "${PYTHON:-python3}" -m bevfusion_ext.deploy infer "$BUNDLE" --backend "${BACKEND:-auto}" "$@"',
]


def _frame_benchmark(flavours: list[str]) -> list[str]:
    """benchmark.sh's last steps: whole frames through the runtime on the engines, then results/benchmark.md."""
    return [
        "",
        "# Whole frames through the runtime (lib/python) on the engines above: FRAMES_WARMUP untimed frames, then",
        "# FRAMES_ITERATIONS timed ones, sequential and pipelined -> results/frames.<flavour>.json (P50 / P99 / FPS).",
        'FRAMES_ITERATIONS="${FRAMES_ITERATIONS:-200}"',
        'FRAMES_WARMUP="${FRAMES_WARMUP:-20}"',
        'export PYTHONPATH="lib/python${PYTHONPATH:+:$PYTHONPATH}"',
        "frames() {  # frames <flavour>",
        '  echo "== whole frames, $1 engines"',
        '  "${PYTHON:-python3}" -m bevfusion_ext.deploy benchmark . --backend tensorrt --flavour "$1" \\',
        '    --iterations "$FRAMES_ITERATIONS" --warmup "$FRAMES_WARMUP" 2>&1 | tee "logs/frames.$1.log"',
        "}",
        *(f"frames {flavour}" for flavour in flavours),
        "# results/benchmark.md: the frame numbers beside every engine's trtexec times and the tegrastats power log",
        '"${PYTHON:-python3}" -m bevfusion_ext.deploy summarize .',
    ]


def write_sample_frames(root: Path, count: int = SAMPLE_FRAMES) -> str | None:
    """The first validation frames of the bundle's own config as data/sample_data/frame_<i>.npz; None, or why the
    runtime cannot run this model (then data/sample_data/README.md says so instead)."""
    config = root / "models" / "config.yaml"
    out = root / "data" / "sample_data"
    out.mkdir(parents=True, exist_ok=True)
    reason = unsupported(yaml.safe_load(config.read_text()).get("model", {}))
    if reason:
        (out / "README.md").write_text(f"No sample frames: the bundle's runtime cannot run this model ({reason}).\n")
        return reason
    cfg, sources = prepare_config(str(config), [])
    dataset = build_dataset(cfg.data.val, "data.val", sources)
    for index in range(min(count, len(dataset))):
        Frame.from_sample(dataset[index]).save(out / f"frame_{index:03d}.npz")
    return None


def install_runtime(root: Path) -> None:
    """lib/python, scripts/run_inference.sh, docs/API.md, data/sample_data and the frame steps of benchmark.sh."""
    package = root / "lib" / "python" / "bevfusion_ext"
    shutil.copytree(RUNTIME_PACKAGE, package / "deploy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (package / "__init__.py").write_text('"""bevfusion-ext: the deploy runtime alone (bevfusion_ext.deploy)."""\n')
    (root / "docs").mkdir(exist_ok=True)
    shutil.copyfile(RUNTIME_PACKAGE / "API.md", root / "docs" / "API.md")
    script = root / "scripts" / "run_inference.sh"
    script.parent.mkdir(exist_ok=True)
    script.write_text("\n".join(RUN_INFERENCE) + "\n")
    script.chmod(0o755)
    reason = write_sample_frames(root)
    report = json.loads((root / "report.json").read_text())
    quantized = any("qdq" in entry["files"] for entry in report["parts"].values())
    lines = ["", f"# No whole-frame timing: {reason}"] if reason else _frame_benchmark(
        ["fp32", "qdq", "noqdq"] if quantized else ["fp32"])
    benchmark = root / "scripts" / "benchmark.sh"
    benchmark.write_text(benchmark.read_text() + "\n".join(lines) + "\n")


def config_yaml(cfg: Any) -> str:
    """The resolved config as plain YAML (tuples as lists): mmcv 1.4's Config.dump() fails on a Config without a file
    name and writes python/tuple tags a safe loader refuses."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=str)), sort_keys=False)


def write_metadata(root: Path, config_dump: str, classes: dict[str, list[str]]) -> None:
    """models/config.yaml (the resolved config the parts were built from) and models/classes.json."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models" / "config.yaml").write_text(config_dump)
    (root / "models" / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")


def _tensor(spec: dict) -> str:
    return f"`{spec['name']}` {spec['dtype']} [{', '.join(map(str, spec['shape']))}]"


def _part_rows(report: dict) -> list[str]:
    rows = ["| part | runs on | inputs | outputs | files |", "|---|---|---|---|---|"]
    for name, entry in report["parts"].items():
        files = ", ".join(f"`{Path(path).name}`" for path in entry["files"].values())
        rows.append(
            f"| {name} | {entry['target'].upper()} | {'<br>'.join(map(_tensor, entry['inputs']))} | "
            f"{'<br>'.join(map(_tensor, entry['outputs']))} | {files} |"
        )
    return rows


def readme(report: dict) -> str:
    """The Orin-side README: prerequisites, how to build, benchmark and log power, and what each part consumes."""
    trt, tag = report["settings"]["trt_version"], report["settings"]["calib_tag"]
    int8 = report["source"]["quantized"]
    kernels = [f"- `{k['name']}` ({k['runs_as']}): {k['notes']}" for k in report["kernels"]]
    lines = [
        "# BEVFusion on Jetson Orin: deploy bundle",
        "",
        f"Generated by `tools/export_engine.py` from `{report['source']['checkpoint']}`. Static shapes, batch 1, "
        f"ONNX opset {report['settings']['opset']}. Numbers and checks: `report.md` / `report.json`.",
        "",
        "## Prerequisites",
        f"- Jetson AGX Orin with JetPack 6.x (TensorRT {trt}); `trtexec` at `/usr/src/tensorrt/bin/trtexec` "
        "(override with `TRTEXEC=/path/to/trtexec`), `tegrastats` and `nvpmodel` (JetPack tools).",
        f"- The calibration caches are tagged `{tag}`: TensorRT rejects a cache written for another version, so "
        "re-export with `--trt-version <x.y>` for a different JetPack.",
        "- DLA engines can only be built on the Orin itself; TensorRT 10.7 was the last release with DLA until 11.4.",
        "",
        "## Build, benchmark, power",
        "```bash",
        "bash scripts/build_engines.sh             # every engine -> engines/, logs in logs/*.build.log",
        "ONLY=fuser bash scripts/build_engines.sh  # a subset (substring of <part>.<target>)",
        "bash scripts/benchmark.sh                 # trtexec timings -> results/*.times.json (ITERATIONS, AVG_RUNS),",
        "                                          # then whole frames -> results/frames.*.json, results/benchmark.md",
        "sudo bash scripts/tegrastats_power.sh     # benchmark while tegrastats logs power every 100 ms",
        "```",
        "Set the power mode first (`sudo nvpmodel -m 0` = MAXN) and `sudo jetson_clocks` for stable timings.",
        "",
        "## Run the deployed model",
        "```bash",
        "bash scripts/run_inference.sh                       # data/sample_data through the engines (onnxruntime "
        "without TensorRT)",
        "bash scripts/run_inference.sh --flavour qdq my_frames/ --out predictions/",
        "```",
        "`lib/python/bevfusion_ext/deploy` is the runtime (torch, numpy, PyYAML, tensorrt or onnxruntime; no training "
        "code): the kernels between the parts (depth image, BEV pool planned once per calibration, voxelization, box "
        "decoding) and one backend per part. Python API and frame format: `docs/API.md`. Accuracy of the deployed "
        "parts against PyTorch: `eval.md` once `tools/eval_deployed.py` has run.",
        "Targets per part: `gpu_fp16` (FP32 ONNX built with --fp16)"
        + (
            ", `gpu_int8` (Q/DQ ONNX), `dla0`/`dla1` (Q/DQ-free ONNX + calibration cache + FP16 layer list, GPU "
            "fallback) and `dla_standalone` (cuDLA loadable, only for parts that fit the DLA entirely)."
            if int8
            else "; this checkpoint has no quantizers, so there are no INT8 / DLA targets."
        ),
        "",
        "## Parts",
        *_part_rows(report),
        "",
        "Data flow:",
        *(f"- {step}" for step in PIPELINE),
        "",
        "## Kernels and pre/post-processing to provide (tensor contracts in report.md)",
        *kernels,
        "",
        "## Layout",
        "```",
        *(
            f"models/<part>/{FILES[key].format(part='<part>'):<28}{what}"
            for key, what in LAYOUT.items()
            if int8 or key == "onnx"
        ),
        "models/config.yaml, models/classes.json",
        "scripts/build_engines.sh, scripts/benchmark.sh, scripts/tegrastats_power.sh, scripts/run_inference.sh",
        "lib/python/bevfusion_ext/deploy/          the runtime (docs/API.md)",
        "data/sample_data/frame_<i>.npz            validation frames of the exported config",
        "report.md, report.json",
        "```",
    ]
    return "\n".join(lines) + "\n"
