"""Synthetic scenes in BEVFusion's own batch format: its real configs train and evaluate on them with overrides only.

`SyntheticNuScenesDataset` is BEVFusion's `NuScenesDataset` whose info file is replaced by generated scenes with the
same info fields, so BEVFusion's own `get_data_info`, `get_ann_info`, `get_cat_ids` and `__getitem__` run on them.
In the config's pipeline the file loaders are swapped for in-memory steps (REPLACED) and file-backed augmentation is
dropped (REMOVED); every other step is BEVFusion's own class.

Frames: the lidar frame is the synthetic ego frame (docs/contract.md) moved to the lidar's mount point LIDAR_ORIGIN,
axes aligned; ego2global is the identity. Boxes use BEVFusion's (mmdet3d < 1.0) LiDAR convention, as its nuScenes
infos do: (x, y, z_bottom, w, l, h, -yaw - pi/2, vx, vy) with yaw the heading CCW from +x and zero velocity.

This module imports BEVFusion's mmdet3d at the top: import it once that is importable (checkout on sys.path, compiled
ops built or `bevfusion_ext.ops.install_cpu_ops()` called first). Nothing imports it at package import.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmdet.datasets.builder import PIPELINES
from mmdet3d.core.bbox import LiDARInstance3DBoxes
from mmdet3d.core.points import get_points_type
from mmdet3d.datasets import NuScenesDataset
from PIL import Image
from pyquaternion import Quaternion

from .evaluation import evaluate_detection, evaluate_segmentation
from .synthetic import (
    LIDAR_ORIGIN,
    RANGE_MARGIN,
    Scene,
    check_classes,
    generate_scene,
    lidar_directions,
    make_camera_rig,
    map_masks,
    render_cameras,
    sample_rngs,
    simulate_lidar_hits,
)

_LOG = logging.getLogger(__name__)

SAMPLE_KEY = "synthetic_sample"  # results key of the RenderedSample the in-memory steps read (set by pre_pipeline)
NUSCENES_IMAGE_SIZE = (900, 1600)  # (H, W) of nuScenes' cameras: what the configs' resize_lim is relative to
NUSCENES_FINAL_DIM = (256, 704)  # BEVFusion's image_size for those cameras
POINT_DIM = 5  # x, y, z, intensity, time lag: nuScenes' point file layout (load_dim)
KEYFRAME_INTERVAL_US = 500_000  # nuScenes keyframes come at 2 Hz
# BEVFusion's object_classes order: TransFusionHead hard-codes pedestrian = 8 and traffic_cone = 9 for nuScenes
NUSCENES_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
                    "pedestrian", "traffic_cone")
URI = "synthetic://"  # prefix of the image / lidar "paths" in the infos; nothing is read from them
# pipeline steps that can run on the info dict alone: BEVFusion's augmentations, filters and formatting
IN_MEMORY_MODULES = ("mmdet3d.datasets.pipelines.transforms_3d", "mmdet3d.datasets.pipelines.formating")
IN_MEMORY_STEPS = ("LoadAnnotations3D",)  # reads the info dict's ann_info, not files


@dataclass(frozen=True)
class RenderedSample:
    """One sample's sensor data, read by the in-memory steps instead of files."""

    images: np.ndarray  # [N, H, W, 3] uint8, camera k as in the infos' cams
    points: np.ndarray  # [P, POINT_DIM] float32 in the lidar frame, time lag 0
    scene: Scene  # ego frame; its map does not depend on z, so lidar-frame xy index it directly


# ------------------------------------------------------------------------------------------- in-memory pipeline steps


def _check_step_options(step: str, checks: dict[str, tuple[object, bool]]) -> None:
    """Refuse loader options synthetic data cannot honour, naming the step and the options."""
    bad = [f"{name}={value!r}" for name, (value, ok) in checks.items() if not ok]
    if bad:
        raise ValueError(f"pipeline step {step}: {', '.join(bad)} not supported on synthetic data (one lidar sweep "
                         f"of {POINT_DIM}-dim LIDAR points; the dataset's lidar_beams sets the beams)")


def _dims(use_dim: int | Sequence[int]) -> list[int]:
    """BEVFusion's use_dim: an int n means the first n columns."""
    return list(range(use_dim)) if isinstance(use_dim, int) else list(use_dim)


class SyntheticMultiViewImages:
    """LoadMultiViewImageFromFiles on the rendered cameras: a list of PIL images and the same shape keys."""

    def __init__(self, to_float32: bool = False, color_type: str = "unchanged") -> None:
        self.to_float32, self.color_type = to_float32, color_type  # BEVFusion's loader ignores both as well

    def __call__(self, results: dict[str, Any]) -> dict[str, Any]:
        images = [Image.fromarray(img) for img in results[SAMPLE_KEY].images]
        size = images[0].size  # (W, H): BEVFusion reports PIL sizes and ImageAug3D reads them so
        results.update(filename=results["image_paths"], img=images, img_shape=size, ori_shape=size, pad_shape=size,
                       scale_factor=1.0)
        return results


class SyntheticPoints:
    """LoadPointsFromFile on the simulated lidar: LIDAR points (x, y, z, intensity, time lag 0)[:, use_dim]."""

    def __init__(self, coord_type: str, load_dim: int = 6, use_dim: int | Sequence[int] = (0, 1, 2),
                 shift_height: bool = False, use_color: bool = False, load_augmented: str | None = None,
                 reduce_beams: int | None = None) -> None:
        _check_step_options("LoadPointsFromFile", {
            "coord_type": (coord_type, coord_type == "LIDAR"), "load_dim": (load_dim, load_dim == POINT_DIM),
            "shift_height": (shift_height, not shift_height), "use_color": (use_color, not use_color),
            "load_augmented": (load_augmented, load_augmented is None),
            "reduce_beams": (reduce_beams, not reduce_beams or reduce_beams >= 32),  # BEVFusion reduces below 32
        })
        self.use_dim = _dims(use_dim)

    def __call__(self, results: dict[str, Any]) -> dict[str, Any]:
        points = results[SAMPLE_KEY].points[:, self.use_dim]
        results["points"] = get_points_type("LIDAR")(points, points_dim=points.shape[-1])
        return results


class SyntheticPointSweeps:
    """LoadPointsFromMultiSweeps without past sweeps: the synthetic lidar has one sweep (time lag 0), so only the
    column selection applies (BEVFusion would stack sweeps_num copies of the key frame when sweeps are empty)."""

    def __init__(self, sweeps_num: int = 10, load_dim: int = 5, use_dim: int | Sequence[int] = (0, 1, 2, 4),
                 pad_empty_sweeps: bool = False, remove_close: bool = False, test_mode: bool = False,
                 load_augmented: str | None = None, reduce_beams: int | None = None) -> None:
        _check_step_options("LoadPointsFromMultiSweeps", {
            "load_dim": (load_dim, load_dim == POINT_DIM), "load_augmented": (load_augmented, load_augmented is None)})
        self.use_dim = _dims(use_dim)

    def __call__(self, results: dict[str, Any]) -> dict[str, Any]:
        results["points"] = results["points"][:, self.use_dim]
        return results


class SyntheticBEVSegmentation:
    """LoadBEVSegmentation on the synthetic map, on BEVFusion's grid: cell (i, j) of [C, X, Y] int64 masks is the
    point (-Lx/2 + i Lx/nx, -Ly/2 + j Ly/ny) of the augmented lidar frame, un-augmented by the rotation and
    translation of lidar_aug_matrix (its scale and flips are not applied, exactly as BEVFusion's map patch)."""

    def __init__(self, dataset_root: str | None, xbound: Sequence[float], ybound: Sequence[float],
                 classes: Sequence[str]) -> None:
        check_classes((), classes)
        self.classes = tuple(classes)
        extent = (xbound[1] - xbound[0], ybound[1] - ybound[0])
        cells = (int(extent[0] / xbound[2]), int(extent[1] / ybound[2]))
        x, y = (-e / 2 + np.arange(n) * e / n for e, n in zip(extent, cells, strict=True))
        self.grid = np.stack(np.meshgrid(x, y, indexing="ij"), axis=-1)  # [X, Y, 2]: nuScenes' map canvas, transposed

    def masks(self, scene: Scene, lidar2global: np.ndarray) -> np.ndarray:
        """Masks [C, X, Y] of the patch centred and turned like `lidar2global` (BEVFusion's patch_box / patch_angle)."""
        yaw = math.atan2(lidar2global[1, 0], lidar2global[0, 0])
        rot = np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
        return map_masks(scene, self.classes, self.grid @ rot.T + lidar2global[:2, 3]).astype(np.int64)

    def __call__(self, results: dict[str, Any]) -> dict[str, Any]:
        lidar2global = results["ego2global"] @ results["lidar2ego"] @ np.linalg.inv(results["lidar_aug_matrix"])
        results["gt_masks_bev"] = self.masks(results[SAMPLE_KEY].scene, lidar2global)
        return results


REPLACED = {
    "LoadMultiViewImageFromFiles": SyntheticMultiViewImages,
    "LoadPointsFromFile": SyntheticPoints,
    "LoadPointsFromMultiSweeps": SyntheticPointSweeps,
    "LoadBEVSegmentation": SyntheticBEVSegmentation,
}
REMOVED = {"ObjectPaste": "pastes objects from a ground-truth database on disk"}


def adapt_pipeline(pipeline: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """The config's pipeline with file loaders replaced and file-backed steps removed, plus what changed (for logs)."""
    steps, changes = [], []
    for index, step in enumerate(pipeline):
        kind = step["type"]
        if kind in REMOVED:
            changes.append(f"removed {kind} ({REMOVED[kind]})")
        elif kind in REPLACED:
            steps.append({**step, "type": REPLACED[kind]})
            changes.append(f"{kind} -> {REPLACED[kind].__name__}")
        else:
            _check_in_memory(index, kind)
            steps.append(step)
    return steps, changes


def _check_in_memory(index: int, kind: str) -> None:
    """Refuse a step that is neither replaced nor known to run on the info dict alone, naming its config entry."""
    step = PIPELINES.get(kind)
    if step is None or not (step.__module__ in IN_MEMORY_MODULES or kind in IN_MEMORY_STEPS
                            or step in REPLACED.values()):
        what = "is not a registered pipeline step" if step is None else "may read files: it has no in-memory version"
        raise ValueError(
            f"pipeline[{index}] (type: {kind}) of the SyntheticNuScenesDataset config (train_pipeline / "
            f"test_pipeline in BEVFusion's YAML) {what}. Synthetic data replaces {sorted(REPLACED)}, removes "
            f"{sorted(REMOVED)} and runs BEVFusion's in-memory transforms and LoadAnnotations3D; drop that step."
        )


# ---------------------------------------------------------------------------------------------------- box formats


def bevfusion_boxes(boxes: np.ndarray) -> np.ndarray:
    """Ego-frame (x, y, z_center, l, w, h, yaw) [M, 7] -> BEVFusion's lidar-frame (x, y, z_bottom, w, l, h, -yaw - pi/2)
    as in its nuScenes infos."""
    x, y, z, length, width, height, yaw = np.asarray(boxes, dtype=np.float64).reshape(-1, 7).T
    return np.stack([x, y, z - height / 2 - LIDAR_ORIGIN[2], width, length, height, -yaw - np.pi / 2], axis=1)


def synthetic_boxes(boxes: LiDARInstance3DBoxes) -> np.ndarray:
    """BEVFusion's boxes -> the evaluator's (x, y, z_center, l, w, h, yaw) [K, 7], in the lidar frame."""
    t = boxes.tensor.detach().cpu().double().numpy().reshape(-1, boxes.box_dim)
    return np.stack([t[:, 0], t[:, 1], t[:, 2] + t[:, 5] / 2, t[:, 4], t[:, 3], t[:, 5], -t[:, 6] - np.pi / 2], axis=1)


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A model output field as numpy."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


# -------------------------------------------------------------------------------------------------------- dataset


def _default_split(ann_file: str | None, test_mode: bool) -> str:
    """'train' for a training info file (BEVFusion's nuscenes_infos_train.pkl), else 'val'; test_mode without one."""
    if ann_file:
        return "train" if "train" in Path(ann_file).name else "val"
    return "val" if test_mode else "train"


def _raw_image_size(pipeline: Sequence[dict]) -> tuple[int, int]:
    """nuScenes' camera size scaled like ImageAug3D's final_dim is from BEVFusion's, so its resize_lim still fits."""
    final = next((s["final_dim"] for s in pipeline if s["type"] == "ImageAug3D"), NUSCENES_FINAL_DIM)
    return tuple(round(n * f / d) for n, f, d in zip(NUSCENES_IMAGE_SIZE, final, NUSCENES_FINAL_DIM, strict=True))


class SyntheticNuScenesDataset(NuScenesDataset):
    """BEVFusion's NuScenesDataset over generated scenes: same info fields, same pipeline classes, no files.

    Sample i is a pure function of (seed, split, i) and the constructor arguments; augmentation draws from numpy's
    global RNG as in BEVFusion. Renders are cached in memory (~2.1 MB per sample at the default 6 x 225 x 400).
    Construction simulates each sample's lidar once (~15 ms) for the per-box point counts of nuScenes' infos
    (num_lidar_pts, valid_flag), which decide which boxes are ground truth, as in BEVFusion.
    """

    def __init__(self, ann_file: str | None = None, pipeline: Sequence[dict] | None = None,
                 dataset_root: str | None = None, object_classes: Sequence[str] = NUSCENES_CLASSES,
                 map_classes: Sequence[str] = ("drivable_area", "walkway"), load_interval: int = 1,
                 with_velocity: bool = True, modality: dict | None = None, box_type_3d: str = "LiDAR",
                 filter_empty_gt: bool = True, test_mode: bool = False, eval_version: str = "detection_cvpr_2019",
                 use_valid_flag: bool = False, num_samples: int = 100, num_cameras: int = 6, seed: int = 0,
                 split: str | None = None, raw_image_size: Sequence[int] | None = None, lidar_beams: int = 32,
                 points_per_beam: int = 1024, min_objects: int = 8, max_objects: int = 24,
                 scene_range: Sequence[float] = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)) -> None:
        check_classes(object_classes, map_classes)
        steps, changes = adapt_pipeline(pipeline) if pipeline is not None else (None, [])
        self.num_samples, self.seed, self.split = num_samples, seed, split or _default_split(ann_file, test_mode)
        self.min_objects, self.max_objects = min_objects, max_objects
        self.scene_range = tuple(float(v) for v in scene_range)
        self.rig = make_camera_rig(num_cameras, tuple(raw_image_size or _raw_image_size(steps or [])))
        self._camera_rays = self.rig.ray_directions()
        self._lidar_rays = lidar_directions(lidar_beams, points_per_beam)
        self._cache: dict[int, RenderedSample] = {}
        # load_interval and eval_version are accepted for NuScenesDataset's signature; they have no effect here
        super().__init__(ann_file=ann_file, pipeline=steps, dataset_root=dataset_root, object_classes=object_classes,
                         map_classes=map_classes, load_interval=load_interval, with_velocity=with_velocity,
                         modality=modality, box_type_3d=box_type_3d, filter_empty_gt=filter_empty_gt,
                         test_mode=test_mode, eval_version=eval_version, use_valid_flag=use_valid_flag)
        self._set_group_flag()  # BEVFusion leaves test-mode datasets without a flag; samplers may want one
        self._token_index = {info["token"]: i for i, info in enumerate(self.data_infos)}
        _LOG.info("SyntheticNuScenesDataset(%s, %d samples, cameras %s): pipeline %s", self.split, len(self),
                  "x".join(map(str, self.rig.image_size)), "; ".join(changes) or "none")

    def scene(self, index: int) -> Scene:
        """Sample `index`'s scene in the ego frame (cheap: no rendering); objects fill the scene range."""
        limit = min(abs(v) for v in self.scene_range[:2] + self.scene_range[3:5]) - RANGE_MARGIN
        rng = sample_rngs(self.seed, self.split, index)[0]
        return generate_scene(rng, self.CLASSES, limit, self.min_objects, self.max_objects, road_half_length=limit)

    def _lidar(self, index: int, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """Lidar-frame points [P, POINT_DIM] inside the scene range, and the box each point hit (-1: ground)."""
        lo, hi = np.add(self.scene_range[:3], LIDAR_ORIGIN), np.add(self.scene_range[3:], LIDAR_ORIGIN)
        rng = sample_rngs(self.seed, self.split, index)[2]
        points, hits = simulate_lidar_hits(scene, rng, self._lidar_rays, (*lo, *hi))
        points[:, :3] -= LIDAR_ORIGIN
        return np.pad(points, ((0, 0), (0, POINT_DIM - points.shape[1]))), hits

    def rendered(self, index: int) -> RenderedSample:
        """Images, points and scene of sample `index`, rendered on first use and cached."""
        if index not in self._cache:
            scene = self.scene(index)
            images = render_cameras(scene, self.rig, sample_rngs(self.seed, self.split, index)[1], self._camera_rays)
            self._cache[index] = RenderedSample(images, self._lidar(index, scene)[0], scene)
        return self._cache[index]

    def load_annotations(self, ann_file: str | None) -> list[dict]:
        """Generated infos in the layout of BEVFusion's nuscenes_infos_*.pkl (the file itself is not read)."""
        return [self._info(i) for i in range(self.num_samples)]

    def _info(self, index: int) -> dict[str, Any]:
        """One nuScenes-style info: sensor poses, synthetic paths, boxes and their lidar point counts."""
        scene = self.scene(index)
        hits = self._lidar(index, scene)[1]
        num_points = np.bincount(hits[hits >= 0], minlength=len(scene.boxes))
        token = f"synthetic-{self.split}-{self.seed}-{index:06d}"
        return {
            "token": token, "lidar_path": f"{URI}{token}/LIDAR_TOP", "sweeps": [], "location": "synthetic",
            "timestamp": index * KEYFRAME_INTERVAL_US,
            "ego2global_rotation": [1.0, 0.0, 0.0, 0.0], "ego2global_translation": [0.0, 0.0, 0.0],
            "lidar2ego_rotation": [1.0, 0.0, 0.0, 0.0], "lidar2ego_translation": LIDAR_ORIGIN.tolist(),
            "cams": {f"CAM_{k}": self._camera_info(token, k) for k in range(len(self.rig.intrinsics))},
            "gt_boxes": bevfusion_boxes(scene.boxes), "gt_velocity": np.zeros((len(scene.boxes), 2)),
            "gt_names": np.array([self.CLASSES[c] for c in scene.labels], dtype=str),
            "num_lidar_pts": num_points, "valid_flag": num_points > 0,
        }

    def _camera_info(self, token: str, cam: int) -> dict[str, Any]:
        """A camera's entry of info['cams']: pose (the rig is in the ego frame) and intrinsics."""
        camera2ego = self.rig.camera2lidar[cam]
        return {
            "data_path": f"{URI}{token}/CAM_{cam}", "camera_intrinsics": self.rig.intrinsics[cam],
            "sensor2ego_rotation": Quaternion(matrix=camera2ego[:3, :3]).elements.tolist(),
            "sensor2ego_translation": camera2ego[:3, 3].tolist(),
            "sensor2lidar_rotation": camera2ego[:3, :3], "sensor2lidar_translation": camera2ego[:3, 3] - LIDAR_ORIGIN,
        }

    def pre_pipeline(self, results: dict[str, Any]) -> None:
        """BEVFusion's result fields plus the rendered sample the in-memory steps read."""
        super().pre_pipeline(results)
        results[SAMPLE_KEY] = self.rendered(self._token_index[results["token"]])

    def map_step(self) -> SyntheticBEVSegmentation:
        """The pipeline's map step: its grid and classes define gt_masks_bev."""
        step = next((t for t in getattr(self.pipeline, "transforms", []) if isinstance(t, SyntheticBEVSegmentation)),
                    None)
        if step is None:
            raise ValueError("the pipeline has no LoadBEVSegmentation step to define the map grid and classes")
        return step

    def gt_masks(self, index: int) -> np.ndarray:
        """Un-augmented gt_masks_bev [C, X, Y] of sample `index` (what the test pipeline yields)."""
        info = self.get_data_info(index)
        return self.map_step().masks(self.scene(index), info["ego2global"] @ info["lidar2ego"])

    def evaluate(self, results: Sequence[dict], metric: object = None, logger: object = None,
                 **kwargs: object) -> dict[str, float]:
        """BEVFusion's test outputs scored against the synthetic ground truth with the project's evaluator:
        det/* when they hold boxes_3d, seg/* when they hold masks_bev; mmcv's eval kwargs are ignored."""
        if len(results) != len(self):
            raise ValueError(f"expected one result per sample ({len(self)}), got {len(results)}")
        metrics: dict[str, float] = {}
        if results and "boxes_3d" in results[0]:
            anns = [self.get_ann_info(i) for i in range(len(self))]
            metrics.update(evaluate_detection(
                [synthetic_boxes(r["boxes_3d"]) for r in results], [_numpy(r["scores_3d"]) for r in results],
                [_numpy(r["labels_3d"]).astype(np.int64) for r in results],
                [synthetic_boxes(a["gt_bboxes_3d"]) for a in anns], [a["gt_labels_3d"] for a in anns], self.CLASSES))
        if results and "masks_bev" in results[0]:
            gt = [self.gt_masks(i) for i in range(len(self))]
            preds = [_numpy(r["masks_bev"]) for r in results]
            metrics.update(evaluate_segmentation(preds, gt, self.map_step().classes))
        return metrics


def register_bevfusion_datasets() -> None:
    """Make `type: SyntheticNuScenesDataset` and the in-memory steps buildable from BEVFusion's configs (idempotent)."""
    from mmdet3d.datasets.builder import DATASETS

    DATASETS.register_module(module=SyntheticNuScenesDataset, force=True)
    for step in REPLACED.values():
        PIPELINES.register_module(module=step, force=True)
