"""SyntheticNuScenesDataset from BEVFusion's real Swin-T camera+lidar config + configs/bevfusion/synthetic_cpu.yaml:

BEVFusion's batch format, consistent augmentation geometry, evaluation, determinism, and its real model on the
batches (snapshot at BEVFUSION_ROOT)."""

import copy
import logging
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import BEVFUSION_ROOT, ROOT, SWINT_DET, SYNTHETIC_CPU

if not (BEVFUSION_ROOT / "mmdet3d/models/fusion_models").is_dir():
    pytest.skip(f"no BEVFusion checkout at {BEVFUSION_ROOT} (set BEVFUSION_ROOT)", allow_module_level=True)

sys.path.insert(0, str(BEVFUSION_ROOT))
from bevfusion_ext.ops import install_cpu_ops  # noqa: E402
from bevfusion_ext.ops.cuda_calls import keep_cuda_calls_on_cpu  # noqa: E402

install_cpu_ops()  # before anything imports mmdet3d

from mmcv import Config  # noqa: E402
from mmcv.parallel import DataContainer, collate  # noqa: E402
from mmdet3d.core.bbox import LiDARInstance3DBoxes  # noqa: E402
from mmdet3d.datasets import build_dataset  # noqa: E402
from mmdet3d.utils import recursive_eval  # noqa: E402
from torchpack.utils.config import Config as TPConfig  # noqa: E402

from bevfusion_ext.datasets import synthetic as syn  # noqa: E402
from bevfusion_ext.datasets.bevfusion_format import (  # noqa: E402
    REPLACED,
    SyntheticNuScenesDataset,
    register_bevfusion_datasets,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LIGHT_LIDAR = 256  # points per beam for the model tests: the CPU sparse convs dominate their time
INFO_KEYS = {"token", "sample_idx", "lidar_path", "sweeps", "timestamp", "location", "ego2global", "lidar2ego",
             "image_paths", "lidar2camera", "lidar2image", "camera2ego", "camera_intrinsics", "camera2lidar",
             "ann_info"}  # NuScenesDataset.get_data_info with the camera modality


def load_cfg() -> Config:
    """The real config with the overlay merged over it, evaluated exactly as BEVFusion's tools/train.py does."""
    tp = TPConfig()
    tp.load(str(BEVFUSION_ROOT / SWINT_DET), recursive=True)
    tp.update(yaml.safe_load((ROOT / SYNTHETIC_CPU).read_text()))  # torchpack deep-merges dicts
    return Config(recursive_eval(tp), filename=str(BEVFUSION_ROOT / SWINT_DET))


@pytest.fixture(scope="module")
def cfg():
    register_bevfusion_datasets()
    return load_cfg()


@pytest.fixture(scope="module")
def train(cfg):
    return build_dataset(cfg.data.train)


@pytest.fixture(scope="module")
def val(cfg):
    return build_dataset(cfg.data.val)


def small(cfg_data: dict, **changes: object) -> dict:
    """A copy of a dataset config with fewer samples (construction simulates each sample's lidar once)."""
    return {**copy.deepcopy(dict(cfg_data)), "num_samples": 4, **changes}


# ---------------------------------------------------------------------------------------------------------- build


def test_real_config_builds_cbgs_train_and_val(cfg, train, val, caplog):
    from mmdet.datasets.builder import PIPELINES
    from mmdet3d.datasets.builder import DATASETS

    register_bevfusion_datasets()  # a second registration is harmless
    assert DATASETS.get("SyntheticNuScenesDataset") is SyntheticNuScenesDataset
    assert all(PIPELINES.get(step.__name__) is step for step in REPLACED.values())
    assert type(train).__name__ == "CBGSDataset" and isinstance(train.dataset, SyntheticNuScenesDataset)
    assert isinstance(val, SyntheticNuScenesDataset) and len(val) == 8 and len(train.dataset) == 16
    assert (train.dataset.split, val.split) == ("train", "val")
    assert train.CLASSES == val.CLASSES == cfg.object_classes and len(train.flag) == len(train) > 64
    assert val.rig.image_size == (225, 400)  # nuScenes' 900 x 1600 scaled like 256 x 704 -> 64 x 176
    with caplog.at_level(logging.INFO, logger="bevfusion_ext"):
        build_dataset(small(cfg.data.train.dataset))
    (line,) = [r.getMessage() for r in caplog.records if "SyntheticNuScenesDataset" in r.getMessage()]
    for change in ("LoadMultiViewImageFromFiles -> SyntheticMultiViewImages", "LoadPointsFromFile -> SyntheticPoints",
                   "removed ObjectPaste", "LoadBEVSegmentation -> SyntheticBEVSegmentation"):
        assert change in line


@pytest.mark.parametrize(("step", "match"), [
    ({"type": "LoadRadarPointsMultiSweeps"}, r"pipeline\[2\] \(type: LoadRadarPointsMultiSweeps\).*not a registered"),
    ({"type": "LoadImageFromFile"}, r"pipeline\[2\] \(type: LoadImageFromFile\).*may read files"),
    ({"type": "LoadPointsFromFile", "coord_type": "LIDAR", "load_dim": 4, "use_dim": 4},
     r"LoadPointsFromFile: load_dim=4 not supported"),
], ids=["unregistered", "file-loader", "bad-option"])
def test_pipeline_steps_without_an_in_memory_version_are_refused(cfg, step, match):
    pipeline = [*cfg.data.val.pipeline[:2], step, *cfg.data.val.pipeline[2:]]
    with pytest.raises(ValueError, match=match):
        build_dataset(small(cfg.data.val, pipeline=pipeline))


def test_data_info_matches_nuscenes_layout_and_rig(val):
    info = val.get_data_info(3)
    assert set(info) == INFO_KEYS and info["sweeps"] == [] and info["sample_idx"] == info["token"]
    ann = info["ann_info"]
    boxes = ann["gt_bboxes_3d"]
    assert isinstance(boxes, LiDARInstance3DBoxes) and boxes.box_dim == 9 and len(boxes) == len(ann["gt_labels_3d"])
    assert not boxes.tensor[:, 7:].any()
    np.testing.assert_allclose(boxes.tensor[:, 2], -syn.LIDAR_ORIGIN[2])  # bottoms on the ground, in the lidar frame
    assert [val.CLASSES[c] for c in ann["gt_labels_3d"]] == list(ann["gt_names"])
    seen = val.data_infos[3]["num_lidar_pts"] > 0  # ground truth = boxes with lidar points, as in BEVFusion
    centres = boxes.gravity_center.numpy() + info["lidar2ego"][:3, 3]  # in the ego frame of the scene
    np.testing.assert_allclose(centres, val.scene(3).boxes[seen, :3], atol=1e-5)
    for k in range(6):
        np.testing.assert_allclose(info["lidar2image"][k], info["camera_intrinsics"][k] @ info["lidar2camera"][k],
                                   atol=1e-4)
        np.testing.assert_allclose(info["camera2lidar"][k] @ info["lidar2camera"][k], np.eye(4), atol=1e-5)
        np.testing.assert_allclose(info["lidar2ego"] @ info["camera2lidar"][k], info["camera2ego"][k], atol=1e-5)


# --------------------------------------------------------------------------------------------------------- batches


def test_sample_has_exactly_the_collect3d_keys_and_types(cfg, train):
    np.random.seed(0)
    sample = train[0]
    collect = cfg.data.train.dataset.pipeline[-1]
    assert set(sample) == {*collect["keys"], *collect["meta_keys"], "metas"}
    img, points, boxes, labels = (sample[k] for k in ("img", "points", "gt_bboxes_3d", "gt_labels_3d"))
    assert isinstance(img, DataContainer) and img.stack and img.data.shape == (6, 3, 64, 176)
    assert img.data.dtype == torch.float32 and abs(float(img.data.mean())) < 2
    assert points.data.dtype == torch.float32 and points.data.shape[1] == 5 and len(points.data) > 10_000
    assert not points.data[:, 4].any()  # one sweep: time lag 0
    assert boxes.cpu_only and isinstance(boxes.data, LiDARInstance3DBoxes) and len(boxes.data) > 0
    assert labels.data.dtype == torch.int64 and len(labels.data) == len(boxes.data)
    masks = sample["gt_masks_bev"]  # BEVFusion's formatting leaves it a numpy array
    assert isinstance(masks, np.ndarray) and masks.dtype == np.int64 and masks.shape == (2, 200, 200)
    assert 0 < masks.mean() < 1
    for key in collect["meta_keys"]:  # per camera, except the two lidar-frame transforms
        shape = (4, 4) if key in ("lidar2ego", "lidar_aug_matrix") else (6, 4, 4)
        assert sample[key].stack and sample[key].data.shape == shape and sample[key].data.dtype == torch.float32
    assert sample["metas"].cpu_only and sample["metas"].data["token"].startswith("synthetic-train-0-")


def _pixel_hits(sample: dict, cfg, ignore_lidar_aug: bool = False) -> tuple[int, int]:
    """Visible GT centres (3-20 m) projected with lidar_aug_matrix^-1, lidar2image and img_aug_matrix that land on a
    pixel of their class colour, and how many were checked."""
    norm = next(s for s in cfg.data.train.dataset.pipeline if s["type"] == "ImageNormalize")
    rgb = sample["img"].data.numpy().transpose(0, 2, 3, 1) * norm["std"] + norm["mean"]
    boxes, labels = sample["gt_bboxes_3d"].data, sample["gt_labels_3d"].data.numpy()
    aug = np.eye(4) if ignore_lidar_aug else np.linalg.inv(sample["lidar_aug_matrix"].data.numpy())
    centres = np.c_[boxes.gravity_center.numpy(), np.ones(len(boxes))] @ aug.T
    hits = checked = 0
    for cam, (l2i, img_aug) in enumerate(zip(sample["lidar2image"].data.numpy(), sample["img_aug_matrix"].data.numpy(),
                                             strict=True)):
        proj = centres @ l2i.T
        uv = proj[:, :2] / np.maximum(proj[:, 2:3], 1e-6)
        uv = np.c_[uv, np.zeros(len(uv)), np.ones(len(uv))] @ img_aug.T
        for (u, v), depth, label in zip(uv[:, :2], proj[:, 2], labels, strict=True):
            if 3 < depth < 20 and 2 <= u < 174 and 2 <= v < 62:
                colour = np.array(syn.PALETTE[cfg.object_classes[label]])
                pixel = rgb[cam, round(v), round(u)]
                hits += np.abs(pixel / pixel.sum() - colour / colour.sum()).sum() < 0.15
                checked += 1
    return hits, checked


def test_augmented_camera_geometry_lands_on_the_rendered_objects(cfg, train):
    # random resize, crop, flip and rotation per camera; 3D rotation, scale, translation and flips
    samples = [_seeded(train.dataset, i, seed=i) for i in range(8)]
    hits, checked = np.sum([_pixel_hits(s, cfg) for s in samples], axis=0)
    assert checked >= 30 and hits >= 0.85 * checked  # the misses are centres hidden behind a nearer object
    wrong, _ = np.sum([_pixel_hits(s, cfg, ignore_lidar_aug=True) for s in samples], axis=0)
    assert wrong < 0.5 * checked  # the check notices a frame mistake


def _map_agreement(points: np.ndarray, masks: np.ndarray, lidar_aug: np.ndarray) -> float:
    """Share of ground points whose intensity class (other / road / walkway) the mask cell under them agrees with.

    BEVFusion's map patch follows lidar_aug_matrix's rotation and translation but not its scale, and cell i of its
    grid is the point -50 m + i * 0.5 m (nuScenes' map canvas)."""
    truth = np.full(len(points), -1)
    for ground, level in enumerate(syn.GROUND_INTENSITY):
        truth[np.abs(points[:, 3] - level) < 0.03] = ground
    scale = np.linalg.norm(lidar_aug[:3, 0])
    cell = np.round((points[truth >= 0, :2] / scale + 50.0) / 0.5).astype(int)
    inside = ((cell >= 0) & (cell < masks.shape[1])).all(axis=1)
    (drivable, walkway), truth = masks[:, cell[inside, 0], cell[inside, 1]], truth[truth >= 0][inside]
    found = np.where(drivable == 1, syn.GROUND_ROAD, np.where(walkway == 1, syn.GROUND_WALKWAY, syn.GROUND_OTHER))
    return float((found == truth).mean())


def test_map_masks_follow_lidar_aug_matrix(train):
    dataset = train.dataset
    follow, static = [], []
    for i in range(6):
        sample = _seeded(dataset, i, seed=10 + i)
        points, aug = sample["points"].data.numpy(), sample["lidar_aug_matrix"].data.numpy()
        follow.append(_map_agreement(points, sample["gt_masks_bev"], aug))
        static.append(_map_agreement(points, dataset.gt_masks(i), aug))
    assert min(follow) > 0.85 and np.mean(follow) > 0.9  # misses: points within a cell of a class border
    assert np.mean(static) < np.mean(follow) - 0.2  # an un-augmented mask would not fit the augmented points


def test_samples_are_deterministic(cfg, val):
    again = build_dataset(cfg.data.val)
    for key in ("img", "points", "lidar2image"):
        assert torch.equal(val[5][key].data, again[5][key].data)
    np.testing.assert_array_equal(val[5]["gt_masks_bev"], again[5]["gt_masks_bev"])
    augmented = build_dataset(small(cfg.data.train.dataset))
    a, b = (_seeded(augmented, 1, seed=4) for _ in range(2))  # augmentation draws from numpy's and torch's RNGs
    assert torch.equal(a["img"].data, b["img"].data) and torch.equal(a["points"].data, b["points"].data)
    other_seed = build_dataset(small(cfg.data.val, seed=1))
    assert not np.array_equal(other_seed.scene(0).boxes, val.scene(0).boxes)


def _seeded(dataset: SyntheticNuScenesDataset, index: int, seed: int) -> dict:
    """dataset[index] with numpy's and torch's global RNGs (augmentation, point shuffle) seeded."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    return dataset[index]


# ------------------------------------------------------------------------------------------------------ evaluation


def test_evaluate_scores_perfect_and_empty_predictions(val):
    anns = [val.get_ann_info(i) for i in range(len(val))]
    perfect = [{"boxes_3d": a["gt_bboxes_3d"], "scores_3d": torch.ones(len(a["gt_labels_3d"])),
                "labels_3d": torch.from_numpy(a["gt_labels_3d"]), "masks_bev": torch.from_numpy(val.gt_masks(i)),
                "gt_masks_bev": torch.from_numpy(val.gt_masks(i))} for i, a in enumerate(anns)]
    metrics = val.evaluate(perfect, metric="bbox", logger=None, pipeline=[])  # mmcv's EvalHook passes such kwargs
    assert metrics["det/mAP"] == pytest.approx(1.0) and metrics["det/NDS"] == pytest.approx(1.0)
    assert metrics["seg/mIoU"] == pytest.approx(1.0) and "det/AP_pedestrian" in metrics and "seg/IoU_walkway" in metrics
    empty = [{"boxes_3d": LiDARInstance3DBoxes(torch.zeros(0, 9), box_dim=9), "scores_3d": torch.zeros(0),
              "labels_3d": torch.zeros(0, dtype=torch.int64)} for _ in anns]
    metrics = val.evaluate(empty)
    assert metrics["det/mAP"] == 0.0 and "seg/mIoU" not in metrics
    with pytest.raises(ValueError, match="one result per sample"):
        val.evaluate(empty[:3])


# ---------------------------------------------------------------------------------------------------- real model


def _unwrap(batch: dict) -> dict:
    """What MMDataParallel hands the model on the CPU: each DataContainer's single chunk."""
    return {k: v.data[0] if isinstance(v, DataContainer) else v for k, v in batch.items()}


@pytest.fixture(scope="module")
def model(cfg):
    from mmdet3d.models import build_model

    torch.manual_seed(0)
    return build_model(cfg.model)


def test_real_bevfusion_trains_on_the_batches(model, cfg):
    # BEVFusion's box overlaps (TransFusion's Hungarian assigner) call .cuda() around the op: the product's own
    # wrappers keep those calls on the CPU (bevfusion_ext/ops/cuda_calls.py), as --cpu-ops does
    keep_cuda_calls_on_cpu()
    model.train()
    train = build_dataset(small(cfg.data.train.dataset, points_per_beam=LIGHT_LIDAR))
    batch = collate([_seeded(train, i, seed=5) for i in range(2)], samples_per_gpu=2)
    loss, log_vars = model._parse_losses(model(**_unwrap(batch)))
    assert math.isfinite(loss.item()) and any(k.startswith("loss/object/") for k in log_vars)
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.encoders["camera"]["backbone"].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_real_bevfusion_test_outputs_are_evaluated(model, cfg):
    model.eval()
    test = build_dataset(small(cfg.data.test, num_samples=2, points_per_beam=LIGHT_LIDAR))
    with torch.no_grad():  # BEVFusion's TransFusion get_bboxes takes one sample per batch at test time
        results = [model(return_loss=False, **_unwrap(collate([test[i]], samples_per_gpu=1)))[0] for i in range(2)]
    assert isinstance(results[0]["boxes_3d"], LiDARInstance3DBoxes) and len(results[0]["scores_3d"]) == 50
    metrics = test.evaluate(results)
    assert 0.0 <= metrics["det/mAP"] <= 1.0 and 0.0 <= metrics["det/NDS"] <= 1.0
