"""What the runtime reads from a deploy bundle (report.json, models/config.yaml, models/classes.json) and the checks
that turn a wrong bundle into one clear line: another format, a part it lacks, a missing file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FORMAT = "bevfusion_ext.export/1"
PARTS = ("camera.backbone", "camera.vtransform", "lidar.backbone", "fuser", "head.object", "head.map")  # data flow
REQUIRED = ("camera.backbone", "lidar.backbone", "fuser", "head.object")
# camera.vtransform: identity when the vtransform does not downsample; head.map: no masks without map classes
FLAVOUR_FILES = {"fp32": "onnx", "qdq": "qdq", "noqdq": "noqdq"}  # runtime flavour -> report.json files key
ENGINE_TARGETS = {"fp32": ("gpu_fp16", "gpu_fp16"), "qdq": ("gpu_int8", "gpu_int8"), "noqdq": ("dla0", "gpu_int8")}
RUNTIME_MODEL = "ReferenceBEVFusion"


class BundleError(ValueError):
    """The bundle cannot be run: the message names the file or key and what to do."""


def unsupported(model_cfg: dict) -> str | None:
    """Why the runtime cannot run a model of this config, or None: it implements the reference model's kernels."""
    kind = model_cfg.get("type")
    if kind != RUNTIME_MODEL:
        return (f"model.type is {kind}: the runtime implements the {RUNTIME_MODEL} kernels (dense voxelization and "
                "lidar encoder part, DepthLSSTransform without image augmentation, its TransFusion decoding); "
                "BEVFusion's own model needs its spconv sparse encoder, a CUDA library with no ONNX part")
    return None


def _get(tree: dict, dotted: str, source: Path) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise BundleError(f"{source} has no {dotted}: the bundle's config does not describe the reference model")
        node = node[key]
    return node


@dataclass(frozen=True)
class KernelConfig:
    """Parameters of the kernels between the parts, as the exported model used them."""

    image_size: tuple[int, int]
    feature_size: tuple[int, int]
    xbound: tuple[float, ...]
    ybound: tuple[float, ...]
    zbound: tuple[float, ...]
    dbound: tuple[float, ...]
    point_cloud_range: tuple[float, ...]
    voxel_size: tuple[float, ...]
    point_dims: int
    pc_range: tuple[float, float]  # box coder origin
    box_voxel_size: tuple[float, float]
    out_size_factor: int
    score_threshold: float
    max_num: int

    @classmethod
    def from_model_config(cls, model: dict, source: Path) -> KernelConfig:
        """The kernel parameters from the dumped `model` section (models/config.yaml)."""
        vt = _get(model, "encoders.camera.vtransform", source)
        vox = _get(model, "encoders.lidar.voxelize", source)
        head = _get(model, "heads.object", source)
        coder = _get(head, "bbox_coder", source)
        proposals = int(_get(head, "num_proposals", source))
        return cls(
            image_size=tuple(vt["image_size"]), feature_size=tuple(vt["feature_size"]),
            xbound=tuple(vt["xbound"]), ybound=tuple(vt["ybound"]), zbound=tuple(vt["zbound"]),
            dbound=tuple(vt["dbound"]), point_cloud_range=tuple(vox["point_cloud_range"]),
            voxel_size=tuple(vox["voxel_size"]), point_dims=int(vox.get("point_dims", 4)),
            pc_range=tuple(coder["pc_range"][:2]), box_voxel_size=tuple(coder["voxel_size"][:2]),
            out_size_factor=int(coder["out_size_factor"]), score_threshold=float(coder.get("score_threshold", 0.0)),
            max_num=int((head.get("test_cfg") or {}).get("max_num", proposals)),
        )


@dataclass(frozen=True)
class BundleSpec:
    """A deploy bundle as the runtime sees it."""

    root: Path
    report: dict
    config: dict  # models/config.yaml
    classes: dict[str, list[str]]
    kernels: KernelConfig

    @classmethod
    def load(cls, root: str | Path) -> BundleSpec:
        """Read and check a bundle directory; any problem is a BundleError naming the file or part."""
        root = Path(root)
        report_path, config_path, classes_path = (root / "report.json", root / "models/config.yaml",
                                                  root / "models/classes.json")
        for path in (report_path, config_path, classes_path):
            if not path.is_file():
                raise BundleError(f"{path} is missing: {root} is not a deploy bundle written by tools/export_engine.py")
        report = json.loads(report_path.read_text())
        if report.get("format") != FORMAT:
            raise BundleError(f"{report_path} has format {report.get('format')!r}, the runtime reads {FORMAT!r}: "
                              "re-export the bundle with this version of tools/export_engine.py")
        config = yaml.safe_load(config_path.read_text())
        reason = unsupported(config.get("model", {}))
        if reason:
            raise BundleError(f"{config_path}: {reason}")
        spec = cls(root, report, config, json.loads(classes_path.read_text()),
                   KernelConfig.from_model_config(config["model"], config_path))
        spec.check_parts()
        return spec

    @property
    def parts(self) -> dict[str, dict]:
        return self.report["parts"]

    def check_parts(self) -> None:
        """Every part the frame needs is in the report (or skipped for a reason the runtime handles)."""
        skipped = self.report.get("skipped_parts", {})
        for name in PARTS:
            if name in self.parts:
                continue
            if name in REQUIRED:
                why = f" (the export skipped it: {skipped[name]})" if name in skipped else ""
                raise BundleError(f"{self.root / 'report.json'} has no part {name}{why}: the runtime needs "
                                  f"{', '.join(REQUIRED)}; re-export without --parts")
            if name == "camera.vtransform" and self.downsample > 1:
                raise BundleError(f"{self.root / 'report.json'} has no part camera.vtransform, but the config "
                                  f"downsamples the camera BEV by {self.downsample}: re-export without --parts")
            if name == "head.map" and self.classes.get("map"):
                raise BundleError(f"{self.root / 'report.json'} has no part head.map, but the model has map classes "
                                  f"{self.classes['map']}: re-export without --parts")

    @property
    def downsample(self) -> int:
        return int(self.config["model"]["encoders"]["camera"]["vtransform"].get("downsample", 1))

    @property
    def num_cameras(self) -> int:
        return int(self.input_spec("camera.backbone", "img")["shape"][0])

    def input_spec(self, part: str, name: str) -> dict:
        return next(spec for spec in self.parts[part]["inputs"] if spec["name"] == name)

    def onnx_path(self, part: str, flavour: str) -> tuple[Path, str]:
        """The part's ONNX file for a flavour and the flavour it really is (a part without quantizers is FP32 only)."""
        files = self.parts[part]["files"]
        key = FLAVOUR_FILES[flavour]
        if key not in files:
            if any("qdq" in entry["files"] for entry in self.parts.values()):
                key, flavour = "onnx", "fp32"  # this part kept no quantizer: the bundle has its FP32 graph only
            else:
                raise BundleError(f"{self.root / 'report.json'}: the bundle has no {flavour} flavour (its checkpoint "
                                  "has no quantizers): run flavour fp32, or export a QAT / PTQ checkpoint")
        path = self.root / files[key]
        if not path.is_file():
            raise BundleError(f"{path} is missing (report.json lists it for part {part}): the bundle is incomplete, "
                              "re-export it")
        return path, flavour

    def engine_path(self, part: str, flavour: str) -> tuple[Path, int | None]:
        """The TensorRT engine of a part for a flavour (built by scripts/build_engines.sh) and its DLA core, if any."""
        commands = self.parts[part]["commands"]
        dla_target, gpu_target = ENGINE_TARGETS[flavour]
        target = dla_target if dla_target in commands else gpu_target
        if target not in commands:
            raise BundleError(f"{self.root / 'report.json'}: part {part} has no {target} engine command (flavour "
                              f"{flavour} needs a quantized export)")
        argv = commands[target]
        path = self.root / next(a.split("=", 1)[1] for a in argv if a.startswith("--saveEngine="))
        if not path.is_file():
            raise BundleError(f"{path} is missing: build it on the Orin with `ONLY={part}.{target} bash "
                              "scripts/build_engines.sh`")
        core = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--useDLACore=")), None)
        return path, core
