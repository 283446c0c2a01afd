"""The deployed model as a whole: one frame of raw inputs (camera images, lidar points, calibration) -> boxes and BEV
map masks, through the bundle's parts and the kernels between them.

    camera: depth image (kernel) -> camera.backbone -> BEV pool (kernel, plan per calibration) -> camera.vtransform
    lidar:  voxelize (kernel) -> lidar.backbone
    fuser (camera_bev, lidar_bev) -> head.object -> decode (kernel); -> head.map -> sigmoid

The stages are separate methods so the pipelined runner (streams.py) can put each on its own thread; `run` is the
sequential frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backends import Backend, OnnxRuntimeBackend, TensorRTBackend
from .kernels import (
    BEVPoolPlan,
    box_scores,
    create_frustum,
    decode_boxes,
    depth_image,
    gen_dx_bx,
    get_geometry,
    select_boxes,
    voxelize_dense,
)
from .spec import PARTS, BundleError, BundleSpec

FRAME_KEYS = ("img", "points", "camera_intrinsics", "camera2lidar")
BOX_KEYS = ("center", "height", "dim", "rot", "heatmap")


class FrameError(ValueError):
    """A frame that does not fit the bundle (camera count, image size, calibration or point layout)."""


@dataclass
class Frame:
    """One frame of raw inputs, as docs/contract.md's sample: normalised images [N, 3, H, W], points [P, >= 4] in
    the ego frame, camera_intrinsics and camera2lidar [N, 4, 4]."""

    img: torch.Tensor
    points: torch.Tensor
    camera_intrinsics: torch.Tensor
    camera2lidar: torch.Tensor
    name: str = ""

    @classmethod
    def from_sample(cls, sample: Mapping, name: str = "") -> Frame:
        """The frame of one dataset sample (extra keys such as ground truth are ignored)."""
        return cls(*(torch.as_tensor(sample[key]).float() for key in FRAME_KEYS), name=name)

    @classmethod
    def load(cls, path: str | Path) -> Frame:
        """A frame saved with `save` (.npz with img, points, camera_intrinsics, camera2lidar)."""
        with np.load(path) as data:
            missing = [key for key in FRAME_KEYS if key not in data]
            if missing:
                raise FrameError(f"{path} has no {', '.join(missing)}: a frame file holds {', '.join(FRAME_KEYS)}")
            return cls(*(torch.from_numpy(data[key]).float() for key in FRAME_KEYS), name=Path(path).stem)

    def save(self, path: str | Path) -> None:
        """Write the frame as a compressed .npz."""
        np.savez_compressed(path, **{key: getattr(self, key).numpy() for key in FRAME_KEYS})


@dataclass
class Prediction:
    """The deployed model's output for one frame, in the PyTorch model's result format."""

    boxes_3d: torch.Tensor  # [K, 7] (x, y, z, l, w, h, yaw), best first
    scores_3d: torch.Tensor  # [K]
    labels_3d: torch.Tensor  # [K] int64
    masks_bev: torch.Tensor | None = None  # [classes, Hm, Wm] probabilities; None without a map head

    def result(self) -> dict[str, torch.Tensor]:
        """As model(return_loss=False) gives one sample (the evaluator's input)."""
        out = {"boxes_3d": self.boxes_3d, "scores_3d": self.scores_3d, "labels_3d": self.labels_3d}
        return out if self.masks_bev is None else {**out, "masks_bev": self.masks_bev}

    def masks(self, threshold: float | list[float] = 0.5) -> torch.Tensor:
        """Binary BEV masks: probability >= threshold (one value, or one per map class)."""
        if self.masks_bev is None:
            raise ValueError("this bundle has no map head, so the prediction has no masks")
        return self.masks_bev >= torch.as_tensor(threshold, dtype=self.masks_bev.dtype).view(-1, 1, 1)


@dataclass
class Prepared:
    """A frame after pre-processing: what the camera and lidar branches consume."""

    img: torch.Tensor
    depth: torch.Tensor  # [N, 1, H, W]
    voxels: torch.Tensor  # [1, C, ny, nx]
    plan: BEVPoolPlan
    name: str = ""


class Runtime:
    """A bundle loaded for inference: one backend per part (flavour fp32 / qdq / noqdq) and the kernels between them.

    backend "onnxruntime" runs the ONNX files (providers: TensorRT / CUDA execution providers when this onnxruntime
    has them, else CPU; `threads` = intra-op threads per session); "tensorrt" runs the engines of
    scripts/build_engines.sh through the TensorRT Python API (the Orin; untested where no GPU ran it). `nms_radius`
    adds circle NMS to the decoding (the model itself has none).
    """

    def __init__(self, bundle: str | Path | BundleSpec, flavour: str = "fp32", backend: str = "onnxruntime",
                 providers: list[str] | None = None, threads: int | None = None,
                 nms_radius: float | None = None) -> None:
        self.spec = bundle if isinstance(bundle, BundleSpec) else BundleSpec.load(bundle)
        if backend not in ("onnxruntime", "tensorrt"):
            raise ValueError(f"backend must be onnxruntime or tensorrt, got {backend!r}")
        self.flavour, self.backend_name, self.nms_radius = flavour, backend, nms_radius
        self.device = torch.device("cuda" if backend == "tensorrt" else "cpu")
        self.flavours: dict[str, str] = {}
        self.parts: dict[str, Backend] = {}
        for part in PARTS:
            if part in self.spec.parts:
                self.parts[part] = self._backend(part, providers, threads)
        k = self.spec.kernels
        self.frustum = create_frustum(k.image_size, k.feature_size, k.dbound).to(self.device)
        self.dx, self.bx, self.nx = (t.to(self.device) for t in gen_dx_bx(k.xbound, k.ybound, k.zbound))
        self.origin = torch.tensor(k.pc_range, dtype=torch.float32)
        self.cell = torch.tensor(k.box_voxel_size, dtype=torch.float32) * k.out_size_factor
        self._calibration: tuple[torch.Tensor, torch.Tensor] | None = None
        self._plan: BEVPoolPlan | None = None

    def _backend(self, part: str, providers: list[str] | None, threads: int | None) -> Backend:
        if self.backend_name == "tensorrt":
            path, core = self.spec.engine_path(part, self.flavour)
            self.flavours[part] = self.flavour
            return TensorRTBackend(path, core)
        path, self.flavours[part] = self.spec.onnx_path(part, self.flavour)
        return OnnxRuntimeBackend(path, providers, threads)

    def describe(self) -> dict[str, str]:
        """Which file and engine runs every part (a part without quantizers runs its FP32 graph in flavour qdq)."""
        return {part: f"{backend.description} [{self.flavours[part]}]" for part, backend in self.parts.items()}

    def check(self, frame: Frame) -> None:
        """Raise FrameError, naming the tensor and the bundle's expectation, if the frame does not fit the bundle."""
        img = self.spec.input_spec("camera.backbone", "img")["shape"]
        n = frame.img.shape[0] if frame.img.dim() == 4 else None
        where = f"frame {frame.name}" if frame.name else "the frame"
        if n != img[0] or list(frame.img.shape[1:]) != img[1:]:
            raise FrameError(f"{where} has img {list(frame.img.shape)} ({n} camera images), but the bundle's "
                             f"camera.backbone takes img {img} ({img[0]} cameras): pass frames of the rig the bundle "
                             "was exported for")
        for key in ("camera_intrinsics", "camera2lidar"):
            if list(getattr(frame, key).shape) != [img[0], 4, 4]:
                raise FrameError(f"{where} has {key} {list(getattr(frame, key).shape)}, the bundle needs "
                                 f"[{img[0]}, 4, 4] (one 4x4 matrix per camera)")
        dims = self.spec.kernels.point_dims
        if frame.points.dim() != 2 or frame.points.shape[1] < dims:
            raise FrameError(f"{where} has points {list(frame.points.shape)}, the bundle needs [P, >= {dims}] "
                             "(x, y, z, intensity, ...)")

    def plan(self, camera_intrinsics: torch.Tensor, camera2lidar: torch.Tensor) -> BEVPoolPlan:
        """The BEV pool plan of this calibration, recomputed only when the calibration changes."""
        calibration = (camera_intrinsics, camera2lidar)
        if self._plan is None or not all(torch.equal(a, b) for a, b in zip(calibration, self._calibration,
                                                                            strict=True)):
            geom = get_geometry(self.frustum, camera2lidar[None].to(self.device),
                                camera_intrinsics[None].to(self.device))
            self._plan = BEVPoolPlan.from_geometry(geom, self.dx, self.bx, self.nx)
            self._calibration = (camera_intrinsics.clone(), camera2lidar.clone())
        return self._plan

    def preprocess(self, frame: Frame) -> Prepared:
        """Checks, the BEV pool plan, the lidar depth image and the voxel grid."""
        self.check(frame)
        points = frame.points.to(self.device)
        intrinsics, camera2lidar = frame.camera_intrinsics.to(self.device), frame.camera2lidar.to(self.device)
        depth = depth_image([points], intrinsics[None], camera2lidar[None], self.spec.kernels.image_size)[0]
        k = self.spec.kernels
        voxels = voxelize_dense([points], k.point_cloud_range, k.voxel_size, k.point_dims)
        return Prepared(frame.img.to(self.device), depth, voxels, self.plan(frame.camera_intrinsics,
                                                                               frame.camera2lidar), frame.name)

    def camera(self, prepared: Prepared) -> torch.Tensor:
        """camera.backbone -> BEV pool -> camera.vtransform: camera_bev [1, C, H, W]."""
        out = self.parts["camera.backbone"].run({"img": prepared.img, "depth": prepared.depth})
        pooled = prepared.plan(out["depth_probs"].to(self.device), out["context"].to(self.device))
        if "camera.vtransform" not in self.parts:
            return pooled
        return self.parts["camera.vtransform"].run({"camera_bev_pooled": pooled})["camera_bev"]

    def lidar(self, prepared: Prepared) -> torch.Tensor:
        """lidar.backbone on the voxel grid: lidar_bev [1, C, H, W]."""
        return self.parts["lidar.backbone"].run({"voxels": prepared.voxels})["lidar_bev"]

    def heads(self, camera_bev: torch.Tensor, lidar_bev: torch.Tensor) -> dict[str, torch.Tensor]:
        """fuser -> head.object (+ head.map): their raw outputs."""
        bev = self.parts["fuser"].run({"camera_bev": camera_bev, "lidar_bev": lidar_bev})["bev_features"]
        raw = self.parts["head.object"].run({"bev_features": bev})
        if "head.map" in self.parts:
            raw.update(self.parts["head.map"].run({"bev_features": bev}))
        return raw

    def postprocess(self, raw: Mapping[str, torch.Tensor]) -> Prediction:
        """Box decoding of the last decoder layer's queries (score threshold, best first, max_num, optional NMS) and
        map probabilities."""
        raw = {name: value.cpu() for name, value in raw.items()}
        labels = raw["query_labels"].long()
        P = labels.shape[-1]
        last = {key: raw[key][..., -P:].float() for key in BOX_KEYS}
        scores = box_scores(last["heatmap"], labels, raw["query_scores"].float())
        boxes = decode_boxes(last["center"], last["height"], last["dim"], last["rot"], self.origin, self.cell)
        k = self.spec.kernels
        selected = select_boxes(boxes[0], scores[0], labels[0], k.score_threshold, k.max_num, self.nms_radius)
        masks = raw["map_logits"][0].float().sigmoid() if "map_logits" in raw else None
        return Prediction(*selected, masks_bev=masks)

    @torch.no_grad()
    def run(self, frame: Frame) -> Prediction:
        """One frame, every stage in turn."""
        prepared = self.preprocess(frame)
        return self.postprocess(self.heads(self.camera(prepared), self.lidar(prepared)))


def load_frames(paths: list[str | Path]) -> list[Frame]:
    """Frames from .npz files and directories of them (sorted by name)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.npz"))
        elif path.is_file():
            files.append(path)
        else:
            raise FrameError(f"{path} does not exist: pass frame .npz files or directories of them")
    if not files:
        raise FrameError(f"no frame .npz files in {', '.join(map(str, paths))}")
    return [Frame.load(path) for path in files]


__all__ = ["BundleError", "Frame", "FrameError", "Prediction", "Prepared", "Runtime", "load_frames"]
