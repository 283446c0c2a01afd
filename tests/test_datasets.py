"""Behavioural tests of the synthetic BEV dataset and its evaluator (geometry, determinism, metrics)."""

import math

import numpy as np
import pytest
import torch

from bevfusion_ext.datasets import SyntheticBEVDataset, collate, evaluate_detection, evaluate_segmentation
from bevfusion_ext.datasets import synthetic as syn

NUM = 6


@pytest.fixture(scope="module")
def ds() -> SyntheticBEVDataset:
    return SyntheticBEVDataset(NUM, seed=7, split="train")


@pytest.fixture(scope="module")
def samples(ds):
    return [ds[i] for i in range(NUM)]


def _classify(rgb: np.ndarray) -> np.ndarray:
    """Nearest palette entry by colour direction (shading scales brightness, not hue)."""
    names = list(syn.PALETTE)
    ref = np.array([syn.PALETTE[n] for n in names])
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    cos = (rgb / np.linalg.norm(rgb, axis=-1, keepdims=True)) @ ref.T
    return np.array(names)[cos.argmax(-1)]


def _raw_rgb(img: torch.Tensor) -> np.ndarray:
    return img.numpy().transpose(0, 2, 3, 1) * syn.IMG_STD + syn.IMG_MEAN


def _project(point: np.ndarray, intrinsics: np.ndarray, cam2lidar: np.ndarray) -> tuple[float, float, float]:
    cam = np.linalg.inv(cam2lidar) @ np.append(point, 1.0)
    uvw = intrinsics[:3, :3] @ cam[:3]
    return uvw[0] / uvw[2], uvw[1] / uvw[2], cam[2]


def _local(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    c, s = math.cos(box[6]), math.sin(box[6])
    d = points[:, :3] - box[:3]
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)


def _perfect_results(ds, shift=0.0):
    out = []
    for i in range(len(ds)):
        scene = ds.scene(i)
        boxes = scene.boxes.copy()
        boxes[:, 0] += shift
        out.append({"boxes_3d": torch.tensor(boxes), "scores_3d": torch.ones(len(boxes)),
                    "labels_3d": torch.tensor(scene.labels), "masks_bev": torch.tensor(ds.gt_masks(i))})
    return out


# ------------------------------------------------------------------------------------------------ data contract


def test_shapes_and_dtypes(ds, samples):
    s = samples[0]
    assert s["img"].shape == (4, 3, 96, 160) and s["img"].dtype == torch.float32
    assert s["camera_intrinsics"].shape == (4, 4, 4) and s["camera2lidar"].shape == (4, 4, 4)
    assert s["points"].ndim == 2 and s["points"].shape[1] == 4 and s["points"].dtype == torch.float32
    assert s["gt_bboxes_3d"].shape[1] == 7 and s["gt_bboxes_3d"].dtype == torch.float32
    assert s["gt_labels_3d"].dtype == torch.int64 and len(s["gt_labels_3d"]) == len(s["gt_bboxes_3d"])
    assert s["gt_masks_bev"].shape == (2, 64, 64) and set(s["gt_masks_bev"].unique().tolist()) <= {0.0, 1.0}
    assert s["metas"] == {"index": 0}
    assert ds.object_classes == ds.CLASSES == ("car", "pedestrian", "barrier")
    assert ds.map_classes == ("drivable_area", "walkway")
    imgs = torch.stack([x["img"] for x in samples])
    assert abs(imgs.mean().item()) < 0.5 and 0.5 < imgs.std().item() < 1.5
    for x in samples:
        assert 4 <= len(x["gt_labels_3d"]) <= 12


def test_determinism_and_splits(ds, samples):
    again = SyntheticBEVDataset(NUM, seed=7, split="train")[3]
    for key in ("img", "points", "gt_bboxes_3d", "gt_labels_3d", "gt_masks_bev"):
        assert torch.equal(samples[3][key], ds[3][key])
        assert torch.equal(samples[3][key], again[key])
    val = SyntheticBEVDataset(NUM, seed=7, split="val")[3]
    other_seed = SyntheticBEVDataset(NUM, seed=8, split="train")[3]
    for other in (val, other_seed):
        assert not torch.equal(samples[3]["gt_bboxes_3d"][:1], other["gt_bboxes_3d"][:1])
    ds[3]["img"].zero_()  # callers get copies: the cache stays intact
    assert torch.equal(ds[3]["img"], samples[3]["img"])
    assert torch.equal(ds[-1]["img"], ds[NUM - 1]["img"])
    with pytest.raises(IndexError):
        ds[NUM]


def test_collate(samples):
    batch = collate(samples[:3])
    assert batch["img"].shape == (3, 4, 3, 96, 160) and batch["gt_masks_bev"].shape == (3, 2, 64, 64)
    assert batch["camera_intrinsics"].shape == (3, 4, 4, 4) and batch["camera2lidar"].shape == (3, 4, 4, 4)
    assert [m["index"] for m in batch["metas"]] == [0, 1, 2]
    assert all(isinstance(batch[k], list) and len(batch[k]) == 3 for k in ("points", "gt_bboxes_3d", "gt_labels_3d"))


def test_camera_rig(samples):
    k, c2l = samples[0]["camera_intrinsics"].numpy(), samples[0]["camera2lidar"].numpy()
    for cam in range(4):
        rot = c2l[cam, :3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-6)
        assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-5)
        yaw = 2 * np.pi * cam / 4
        np.testing.assert_allclose(rot[:, 2], [math.cos(yaw), math.sin(yaw), 0], atol=1e-6)  # z forward
        np.testing.assert_allclose(rot[:, 1], [0, 0, -1], atol=1e-6)  # y down
        np.testing.assert_allclose(c2l[cam, :3, 3], [0, 0, syn.CAMERA_HEIGHT], atol=1e-6)
        assert math.degrees(2 * math.atan(80 / k[cam, 0, 0])) == pytest.approx(100.0, abs=1e-3)
        np.testing.assert_allclose(k[cam, :2, 2], [79.5, 47.5])
        np.testing.assert_allclose(k[cam, 3], [0, 0, 0, 1])


# ------------------------------------------------------------------------------------------------------ scenes


def test_object_placement(ds):
    limit = 25.6 - syn.RANGE_MARGIN
    for i in range(NUM):
        scene = ds.scene(i)
        for a, (box, label) in enumerate(zip(scene.boxes, scene.labels, strict=True)):
            name = ds.object_classes[label]
            assert np.abs(box[:2]).max() <= limit and box[2] == pytest.approx(box[5] / 2)
            assert syn.distance_to_footprint(box) > syn.EGO_CLEARANCE
            np.testing.assert_allclose(box[3:6], syn.OBJECT_SIZES[name], rtol=0.11)
            ground = scene.ground_class(box[:2])
            assert ground == {"car": syn.GROUND_ROAD, "pedestrian": syn.GROUND_WALKWAY}.get(name, ground)
            assert not any(syn.footprints_overlap(box, other) for other in scene.boxes[a + 1:])


def test_masks_match_road_geometry(ds, samples):
    lo, cell = -25.6, 0.8
    rng = np.random.default_rng(0)
    for i in range(NUM):
        scene, masks = ds.scene(i), samples[i]["gt_masks_bev"].numpy()
        for r, c in rng.integers(0, 64, (200, 2)):
            x, y = lo + (c + 0.5) * cell, lo + (r + 0.5) * cell
            lat = [abs(-math.sin(rd.yaw) * x + math.cos(rd.yaw) * y - rd.offset) for rd in scene.roads]
            road = any(d <= rd.width / 2 for d, rd in zip(lat, scene.roads, strict=True))
            walk = not road and any(d <= rd.width / 2 + rd.walkway for d, rd in zip(lat, scene.roads, strict=True))
            assert (masks[0, r, c], masks[1, r, c]) == (float(road), float(walk))


def test_mask_orientation_rows_are_y():
    road = syn.Road(yaw=0.0, offset=10.2, width=8.0, walkway=2.0)  # along x, drivable for y in [6.2, 14.2]
    scene = syn.Scene([road], np.zeros((0, 7)), np.zeros(0, dtype=np.int64), ("car",))
    masks = syn.rasterise_map(scene, ("drivable_area", "walkway"), (-25.6, 25.6, 0.8))

    def row(y: float) -> int:
        return int((y + 25.6) // 0.8)

    assert masks[0, row(10.0)].all() and not masks[0, row(0.0)].any()
    assert np.nonzero(masks[0, :, 5])[0].tolist() == list(range(40, 50))  # cell centres y = 6.8 .. 14.0
    assert masks[1, row(15.0)].all() and masks[1, row(5.0)].all() and not masks[1, row(10.0)].any()


# ----------------------------------------------------------------------------------------------------- cameras


def _occluded(origin: np.ndarray, scene: syn.Scene, j: int) -> bool:
    """Whether the sight line to box j's centre passes through (or within 0.15 m of) another box."""
    line = origin + np.linspace(0.0, 1.0, 400)[:, None] * (scene.boxes[j, :3] - origin)
    return any((np.abs(_local(line, b)) <= b[3:6] / 2 + 0.15).all(axis=1).any()
               for k, b in enumerate(scene.boxes) if k != j)


def test_box_centres_project_onto_their_class_colour(ds, samples):
    hits = total = 0
    for i in range(NUM):
        scene, s = ds.scene(i), samples[i]
        rgb = _raw_rgb(s["img"])
        for j, label in enumerate(scene.labels):
            for cam in range(4):
                k, c2l = s["camera_intrinsics"][cam].numpy(), s["camera2lidar"][cam].numpy()
                u, v, depth = _project(scene.boxes[j, :3], k, c2l)
                if depth > 1.0 and 2 <= u <= 157 and 2 <= v <= 93 and not _occluded(c2l[:3, 3], scene, j):
                    total += 1
                    hits += _classify(rgb[cam, round(v), round(u)]) == ds.object_classes[label]
    assert total >= 3 * NUM and hits == total


def test_pixels_match_independent_ray_marching(ds, samples):
    ground_names = {syn.GROUND_OTHER: "other", syn.GROUND_ROAD: "road", syn.GROUND_WALKWAY: "walkway"}
    agree = total = 0
    for i in range(2):
        scene, s = ds.scene(i), samples[i]
        rgb = _raw_rgb(s["img"])
        v, u = np.mgrid[2:96:4, 2:160:4].reshape(2, -1)
        for cam in range(4):
            k, c2l = s["camera_intrinsics"][cam].numpy().astype(float), s["camera2lidar"][cam].numpy().astype(float)
            dirs = (c2l[:3, :3] @ np.linalg.inv(k[:3, :3]) @ np.stack([u, v, np.ones_like(u)])).T
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            origin = c2l[:3, 3]
            steps = np.linspace(0.05, 40.0, 400)
            t_ground = np.where(dirs[:, 2] < 0, -origin[2] / np.minimum(dirs[:, 2], -1e-9), np.inf)
            t_box, label = np.full(len(dirs), np.inf), np.full(len(dirs), -1)
            for box, lab in zip(scene.boxes, scene.labels, strict=True):
                pts = origin + steps[:, None, None] * dirs[None]
                inside = (np.abs(_local(pts.reshape(-1, 3), box).reshape(pts.shape)) <= box[3:6] / 2).all(-1)
                t = np.where(inside.any(0), steps[inside.argmax(0)], np.inf)
                label = np.where(t < t_box, lab, label)
                t_box = np.minimum(t, t_box)
            ground_xy = origin[:2] + np.minimum(t_ground, 1e3)[:, None] * dirs[:, :2]
            expected = np.where(t_box < t_ground, np.array(ds.object_classes)[label],
                                [ground_names[g] for g in scene.ground_class(ground_xy)])
            expected = np.where(np.isinf(np.minimum(t_box, t_ground)), "sky", expected)
            got = np.char.replace(_classify(rgb[cam, v, u]), "sky_zenith", "sky")
            got = np.char.replace(got, "sky_horizon", "sky")
            known = np.minimum(t_box, t_ground) < 40.0
            known |= np.isinf(t_ground) & np.isinf(t_box)
            agree += (got == expected)[known].sum()
            total += known.sum()
    assert total > 5000 and agree / total > 0.99


def test_nearer_box_occludes_farther():
    rig = syn.make_camera_rig(4, (96, 160))
    for near, far in (("car", "pedestrian"), ("pedestrian", "car")):
        names = ("car", "pedestrian")
        boxes = np.array([[8.0, 0, 0, 0, 0, 0, 0], [14.0, 0, 0, 0, 0, 0, 0]])
        for b, name in zip(boxes, (near, far), strict=True):
            b[3:6] = syn.OBJECT_SIZES[name]
            b[2] = b[5] / 2
        scene = syn.Scene([syn.Road(0.0, 0.0, 10.0, 2.5)], boxes, np.array([names.index(near), names.index(far)]),
                          names)
        img = syn.render_cameras(scene, rig, np.random.default_rng(0))[0] / 255.0
        u, v, _ = _project(boxes[1, :3], rig.intrinsics[0], rig.camera2lidar[0])
        assert _classify(img[round(v), round(u)]) == near
        assert _classify(img[90, 80]) == "road" and _classify(img[5, 80]) == "sky_zenith"


# ------------------------------------------------------------------------------------------------------- lidar


def test_lidar_hits_boxes_or_ground(ds, samples):
    seen = near = 0
    for i in range(NUM):
        scene, pts = ds.scene(i), samples[i]["points"].numpy()
        assert (np.abs(pts[:, :2]) < 25.6).all() and 2000 < len(pts) <= 32 * 360
        near_box = np.zeros(len(pts), dtype=bool)
        for box, label in zip(scene.boxes, scene.labels, strict=True):
            inside = (np.abs(_local(pts, box)) <= box[3:6] / 2 + 0.1).all(axis=1)
            near_box |= inside
            above_ground = inside & (pts[:, 2] > 0.1)
            intensity = syn.OBJECT_INTENSITY[ds.object_classes[label]]
            assert np.abs(pts[above_ground, 3] - intensity).max(initial=0) < 0.2
            if np.hypot(*box[:2]) < 15:
                near += 1
                seen += above_ground.sum() >= 5
        ground = pts[~near_box]  # everything away from the boxes lies on the ground, with the ground's intensity
        assert np.abs(ground[:, 2]).max() < 0.1
        expected = syn.GROUND_INTENSITY[scene.ground_class(ground[:, :2].astype(np.float64))]
        assert np.abs(ground[:, 3] - expected).max() < 0.2
    assert near > 0 and seen / near >= 0.8


def test_lidar_does_not_see_through_boxes(ds, samples):
    for i in range(NUM):
        scene, pts = ds.scene(i), samples[i]["points"].numpy().astype(np.float64)
        ground = pts[np.abs(pts[:, 2]) < 0.1, :3]
        for box in scene.boxes:
            # BEV pre-filter: rays whose footprint passes within the box's circumradius
            tau = np.clip(ground[:, :2] @ box[:2] / (ground[:, :2] ** 2).sum(1), 0.0, 1.0)
            near = np.linalg.norm(box[:2] - tau[:, None] * ground[:, :2], axis=1) < np.hypot(*box[3:5]) / 2
            seg = ground[near]
            along = syn.LIDAR_ORIGIN + np.linspace(0.0, 0.98, 300)[:, None, None] * (seg[None] - syn.LIDAR_ORIGIN)
            local = _local(along.reshape(-1, 3), box).reshape(300, -1, 3)
            assert not (np.abs(local) < box[3:6] / 2 - 0.05).all(axis=-1).any()


# --------------------------------------------------------------------------------------------------- evaluator


def test_perfect_predictions_score_one(ds):
    metrics = ds.evaluate(_perfect_results(ds), logger=None)
    assert metrics["det/mAP"] == pytest.approx(1.0) and metrics["det/NDS"] == pytest.approx(1.0)
    assert metrics["seg/mIoU"] == pytest.approx(1.0)
    for name in ds.object_classes:
        assert metrics[f"det/AP_{name}"] == pytest.approx(1.0)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("det/mAP", "det/NDS", "seg/mIoU"))


def test_shifted_predictions_only_match_loose_thresholds(ds):
    metrics = ds.evaluate(_perfect_results(ds, shift=1.5))
    for name in ds.object_classes:
        assert metrics[f"det/AP_{name}@0.5"] == 0.0 and metrics[f"det/AP_{name}@1.0"] == 0.0
        assert metrics[f"det/AP_{name}@2.0"] > 0.5 and metrics[f"det/AP_{name}@4.0"] > 0.5
    assert 0.25 < metrics["det/mAP"] <= 0.5 + 1e-9
    assert metrics["det/mATE"] == pytest.approx(1.5, abs=1e-4)


def test_random_and_empty_predictions(ds):
    rng = np.random.default_rng(1)
    random = [{"boxes_3d": np.c_[rng.uniform(-25, 25, (30, 2)), np.full((30, 1), 0.8),
                                 np.tile([4.5, 1.9, 1.6, 0.0], (30, 1))],
               "scores_3d": rng.random(30), "labels_3d": rng.integers(0, 3, 30),
               "masks_bev": rng.random((2, 64, 64))} for _ in range(NUM)]
    assert ds.evaluate(random)["det/mAP"] < 0.05
    empty = [{"boxes_3d": torch.zeros(0, 7), "scores_3d": torch.zeros(0), "labels_3d": torch.zeros(0, dtype=torch.long),
              "masks_bev": torch.zeros(2, 64, 64)} for _ in range(NUM)]
    for results in (empty, [{} for _ in range(NUM)]):
        metrics = ds.evaluate(results)
        assert metrics["det/mAP"] == 0.0 and metrics["det/NDS"] == 0.0 and metrics["seg/mIoU"] == 0.0
    with pytest.raises(ValueError):
        ds.evaluate(empty[:-1])
    with pytest.raises(ValueError):  # e.g. 9-column boxes with velocity must not be silently reshaped
        ds.evaluate([{"boxes_3d": torch.zeros(7, 9), "scores_3d": torch.zeros(7), "labels_3d": torch.zeros(7)}] * NUM)


def test_hand_computed_ap():
    # one GT; a false positive outranks the true positive: precision = recall / 2 on the 101-point grid,
    # AP = mean_{k=11..100} max(0, k/200 - 0.1) / 0.9 = (sum_{k=21..100} (k/200 - 0.1)) / 90 / 0.9 = 0.2
    gt = [np.array([[5.0, 5.0, 0.8, 4.5, 1.9, 1.6, 0.0]])]
    pred = [np.array([[-5.0, -5.0, 0.8, 4.5, 1.9, 1.6, 0.0], [5.0, 5.0, 0.8, 4.5, 1.9, 1.6, 0.0]])]
    metrics = evaluate_detection(pred, [np.array([0.9, 0.8])], [np.array([0, 0])], gt, [np.array([0])], ("car",))
    assert metrics["det/mAP"] == pytest.approx(0.2)
    assert np.isnan(evaluate_detection(pred, [np.array([0.9, 0.8])], [np.array([0, 0])], gt, [np.array([0])],
                                       ("car", "barrier"))["det/AP_barrier"])


def test_tp_errors():
    gt = np.array([[5.0, 5.0, 0.5, 0.5, 2.5, 1.0, 0.3], [-8.0, 3.0, 0.8, 4.5, 1.9, 1.6, 1.0]])
    pred = gt.copy()
    pred[:, 0] += 0.3  # ATE 0.3
    pred[:, 3:6] *= 1.1  # ASE 1 - 1 / 1.331
    pred[:, 6] += np.pi  # barrier is pi-periodic (AOE 0), the car is facing backwards (AOE pi)
    metrics = evaluate_detection([pred], [np.ones(2)], [np.array([1, 0])], [gt], [np.array([1, 0])],
                                 ("car", "barrier"))
    assert metrics["det/ATE_car"] == pytest.approx(0.3) and metrics["det/ASE_barrier"] == pytest.approx(1 - 1 / 1.331)
    assert metrics["det/AOE_barrier"] == pytest.approx(0.0, abs=1e-9) and metrics["det/AOE_car"] == pytest.approx(np.pi)
    expected_nds = (5 * 1.0 + (1 - 0.3) + 1 / 1.331 + 0.0) / 8  # mean AOE pi / 2 is clipped to 1
    assert metrics["det/NDS"] == pytest.approx(expected_nds)


def test_segmentation_iou():
    gt = np.zeros((2, 2, 2))
    gt[0, 0] = 1  # class 0: top row
    pred = np.zeros((2, 2, 2))
    pred[0, 0, 0], pred[0, 1, 0], pred[0, 0, 1] = 0.9, 0.5, 0.45
    # t <= 0.45: tp 2, fp 1 -> 2/3; t = 0.5: tp 1, fp 1, fn 1 -> 1/3; t >= 0.55: tp 1, fn 1 -> 1/2; max = 2/3
    metrics = evaluate_segmentation([pred], [gt], ("a", "b"))
    assert metrics["seg/IoU_a"] == pytest.approx(2 / 3) and np.isnan(metrics["seg/IoU_b"])
    assert metrics["seg/mIoU"] == pytest.approx(2 / 3)
