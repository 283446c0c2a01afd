"""Deterministic synthetic driving scenes: road map, 3D boxes, ray-traced cameras and a spinning lidar.

Frames follow docs/contract.md: ego/lidar frame x forward, y left, z up, ground plane z = 0.
Only numpy and torch are imported so the data can be used with or without mmcv/mmdet.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .evaluation import evaluate_detection, evaluate_segmentation

GROUND_OTHER, GROUND_ROAD, GROUND_WALKWAY = 0, 1, 2
MAP_CLASS_TO_GROUND = {"drivable_area": GROUND_ROAD, "walkway": GROUND_WALKWAY}
# (l, w, h); the classes after barrier are nuScenes' other detection classes at their mean sizes
OBJECT_SIZES = {"car": (4.5, 1.9, 1.6), "pedestrian": (0.7, 0.7, 1.75), "barrier": (0.5, 2.5, 1.0),
                "truck": (6.9, 2.5, 2.8), "construction_vehicle": (6.4, 2.8, 3.2), "bus": (11.0, 2.9, 3.5),
                "trailer": (12.0, 2.9, 3.9), "motorcycle": (2.1, 0.8, 1.5), "bicycle": (1.7, 0.6, 1.3),
                "traffic_cone": (0.4, 0.4, 1.1)}
# relative weights, normalised over the requested classes
OBJECT_FREQUENCY = {"car": 0.5, "pedestrian": 0.3, "barrier": 0.2, "truck": 0.1, "construction_vehicle": 0.05,
                    "bus": 0.05, "trailer": 0.05, "motorcycle": 0.06, "bicycle": 0.06, "traffic_cone": 0.12}
# road users drive in a lane: their centre stays this far inside the road edge; others stand on walkways / edges
LANE_MARGIN = {"car": 1.2, "truck": 1.5, "construction_vehicle": 1.6, "bus": 1.7, "trailer": 1.7, "motorcycle": 0.8,
               "bicycle": 0.8}

# Linear RGB in [0, 1]. Object colours differ in hue from each other and from the ground so classes stay separable.
PALETTE = {
    "car": (0.85, 0.12, 0.12),
    "pedestrian": (0.70, 0.20, 0.85),
    "barrier": (0.95, 0.80, 0.10),
    "truck": (0.10, 0.20, 0.80),
    "construction_vehicle": (0.95, 0.45, 0.05),
    "bus": (0.05, 0.75, 0.75),
    "trailer": (0.45, 0.10, 0.95),
    "motorcycle": (0.90, 0.15, 0.55),
    "bicycle": (0.15, 0.85, 0.25),
    "traffic_cone": (0.60, 0.95, 0.05),
    "road": (0.32, 0.32, 0.34),
    "walkway": (0.68, 0.64, 0.58),
    "other": (0.30, 0.48, 0.24),
    "sky_zenith": (0.45, 0.62, 0.90),
    "sky_horizon": (0.78, 0.85, 0.95),
}
GROUND_COLORS = np.array([PALETTE["other"], PALETTE["road"], PALETTE["walkway"]])
GROUND_INTENSITY = np.array([0.10, 0.20, 0.35])
OBJECT_INTENSITY = {"car": 0.80, "pedestrian": 0.50, "barrier": 0.95, "truck": 0.75, "construction_vehicle": 0.85,
                    "bus": 0.70, "trailer": 0.65, "motorcycle": 0.60, "bicycle": 0.55, "traffic_cone": 0.90}
LIGHT_DIR = np.array([0.35, 0.25, 0.90]) / np.linalg.norm([0.35, 0.25, 0.90])
IMG_MEAN = np.array([0.506, 0.561, 0.631], dtype=np.float32)  # per-channel statistics of 100 default-config samples
IMG_STD = np.array([0.167, 0.215, 0.310], dtype=np.float32)

CAMERA_HEIGHT = 1.6
CAMERA_FOV_OVERLAP_DEG = 10.0
CAMERA_MAX_HFOV_DEG = 120.0
LIDAR_ORIGIN = np.array([0.0, 0.0, 1.8])
LIDAR_ELEVATION_DEG = (-25.0, 3.0)
LIDAR_RANGE_NOISE = 0.02
EGO_CLEARANCE = 2.0  # no box footprint within this distance of the ego origin
RANGE_MARGIN = 2.0  # box centres stay this far inside the BEV range
BOX_GAP = 0.3  # minimum free space between two box footprints
FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
ROAD_HALF_LENGTH = 40.0


@dataclass(frozen=True)
class Road:
    """A straight road band; its walkways run along both edges."""

    yaw: float  # direction of the road axis, CCW from +x
    offset: float  # signed distance of the centre line from the origin along the left normal (-sin, cos)
    width: float
    walkway: float  # width of each walkway

    def lateral(self, xy: np.ndarray) -> np.ndarray:
        """Signed distance of points [..., 2] from the centre line (positive = left of the road axis)."""
        return -math.sin(self.yaw) * xy[..., 0] + math.cos(self.yaw) * xy[..., 1] - self.offset


@dataclass
class Scene:
    """Everything that defines a sample's content; images, lidar and masks are pure functions of it."""

    roads: list[Road]
    boxes: np.ndarray  # [M, 7] (x, y, z_center, length, width, height, yaw)
    labels: np.ndarray  # [M] int64 index into object_classes
    object_classes: tuple[str, ...]

    def ground_class(self, xy: np.ndarray) -> np.ndarray:
        """Ground class (GROUND_*) at points [..., 2]; drivable area wins over another road's walkway."""
        road = np.zeros(xy.shape[:-1], dtype=bool)
        walk = np.zeros_like(road)
        for r in self.roads:
            lat = np.abs(r.lateral(xy))
            road |= lat <= r.width / 2
            walk |= lat <= r.width / 2 + r.walkway
        return np.where(road, GROUND_ROAD, np.where(walk, GROUND_WALKWAY, GROUND_OTHER))


@dataclass(frozen=True)
class CameraRig:
    """Pinhole cameras at the ego origin; pixel centres sit at integer coordinates (OpenCV / BEVFusion frustum)."""

    intrinsics: np.ndarray  # [N, 3, 3]
    camera2lidar: np.ndarray  # [N, 4, 4], camera axes x right, y down, z forward
    image_size: tuple[int, int]  # (H, W)

    def ray_directions(self) -> np.ndarray:
        """Unit ego-frame ray directions [N, H*W, 3] through every pixel centre, row-major."""
        h, w = self.image_size
        v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        k = self.intrinsics
        x = (u.ravel()[None] - k[:, 0, 2, None]) / k[:, 0, 0, None]
        y = (v.ravel()[None] - k[:, 1, 2, None]) / k[:, 1, 1, None]
        cam = np.stack([x, y, np.ones_like(x)], axis=-1)
        cam /= np.linalg.norm(cam, axis=-1, keepdims=True)
        return np.einsum("nij,npj->npi", self.camera2lidar[:, :3, :3], cam)


def make_camera_rig(num_cameras: int, image_size: tuple[int, int]) -> CameraRig:
    """Evenly spread yaws from 0 (forward) CCW; horizontal FOV covers 360 deg with overlap (capped at 120 deg)."""
    h, w = image_size
    hfov = math.radians(min(360.0 / num_cameras + CAMERA_FOV_OVERLAP_DEG, CAMERA_MAX_HFOV_DEG))
    f = (w / 2) / math.tan(hfov / 2)
    k = np.array([[f, 0.0, (w - 1) / 2], [0.0, f, (h - 1) / 2], [0.0, 0.0, 1.0]])
    rigs = []
    for yaw in 2 * np.pi * np.arange(num_cameras) / num_cameras:
        c, s = math.cos(yaw), math.sin(yaw)
        t = np.eye(4)
        t[:3, :3] = np.array([[s, 0.0, c], [-c, 0.0, s], [0.0, -1.0, 0.0]])  # columns: right, down, forward
        t[:3, 3] = (0.0, 0.0, CAMERA_HEIGHT)
        rigs.append(t)
    return CameraRig(np.repeat(k[None], num_cameras, 0), np.stack(rigs), (h, w))


def box_corners(box: np.ndarray) -> np.ndarray:
    """The 8 corners [8, 3] of a (x, y, z_center, l, w, h, yaw) box in the ego frame."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    local = signs * np.asarray(box[3:6]) / 2
    c, s = math.cos(box[6]), math.sin(box[6])
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return local @ rot.T + np.asarray(box[:3])


def ray_box_intersection(origin: np.ndarray, dirs: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab-method entry distance t (inf on miss) for rays o + t*d, and the entry face id (see FACE_NORMALS)."""
    c, s = math.cos(box[6]), math.sin(box[6])
    rel = origin - box[:3]
    o_local = (c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2])
    d_local = (c * dirs[:, 0] + s * dirs[:, 1], -s * dirs[:, 0] + c * dirs[:, 1], dirs[:, 2])
    t_near = t_far = face = None
    for axis in range(3):
        half = box[3 + axis] / 2
        inv = 1.0 / np.where(np.abs(d_local[axis]) < 1e-12, 1e-12, d_local[axis])
        t1, t2 = (-half - o_local[axis]) * inv, (half - o_local[axis]) * inv
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        axis_face = 2 * axis + (d_local[axis] > 0)  # a ray travelling along +axis enters through the -axis face
        if t_near is None:
            t_near, t_far, face = lo, hi, axis_face
        else:
            face = np.where(lo > t_near, axis_face, face)
            t_near, t_far = np.maximum(t_near, lo), np.minimum(t_far, hi)
    hit = (t_near <= t_far) & (t_near > 0)
    return np.where(hit, t_near, np.inf), face


def ground_intersection(origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Distance parameter t where rays hit the plane z = 0 (inf for rays at or above the horizon)."""
    down = dirs[:, 2] < -1e-9
    return np.where(down, -origin[2] / np.where(down, dirs[:, 2], -1.0), np.inf)


def _azimuth_candidates(origin: np.ndarray, ray_azimuth: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Indices of rays whose azimuth falls in the box's angular span seen from origin (which lies outside it)."""
    corners = box_corners(box)[::2, :2] - origin[:2]  # the 4 bottom corners
    centre = math.atan2(box[1] - origin[1], box[0] - origin[0])
    rel = (np.arctan2(corners[:, 1], corners[:, 0]) - centre + np.pi) % (2 * np.pi) - np.pi
    mid, half = (rel.max() + rel.min()) / 2, (rel.max() - rel.min()) / 2 + 0.02
    return np.nonzero(np.abs((ray_azimuth - centre - mid + np.pi) % (2 * np.pi) - np.pi) <= half)[0]


def _cast(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit per ray: distance parameter t and hit box index (-1 = ground or nothing)."""
    t_best = ground_intersection(origin, dirs)
    hit_box = np.full(len(dirs), -1)
    azimuth = np.arctan2(dirs[:, 1], dirs[:, 0])
    for j, box in enumerate(boxes):
        idx = _azimuth_candidates(origin, azimuth, box)
        t, _ = ray_box_intersection(origin, dirs[idx], box)
        closer = t < t_best[idx]
        t_best[idx[closer]], hit_box[idx[closer]] = t[closer], j
    return t_best, hit_box


# ----------------------------------------------------------------------------------------------- scene generation


def _sample_roads(rng: np.random.Generator) -> list[Road]:
    """The ego's road (roughly along +x, ego on it) and, 60 % of the time, a crossing road."""
    width = rng.uniform(7.0, 12.0)
    roads = [Road(rng.uniform(-0.35, 0.35), rng.uniform(-(width / 2 - 1.5), width / 2 - 1.5), width,
                  rng.uniform(2.0, 3.0))]
    if rng.random() < 0.6:
        roads.append(Road(roads[0].yaw + rng.uniform(np.pi / 4, 3 * np.pi / 4), rng.uniform(-15.0, 15.0),
                          rng.uniform(7.0, 12.0), rng.uniform(2.0, 3.0)))
    return roads


def _propose_object(rng: np.random.Generator, name: str, roads: list[Road],
                    half_length: float = ROAD_HALF_LENGTH) -> tuple[np.ndarray, np.ndarray, int]:
    """A candidate box placed by class rules (within half_length along its road), plus a probe point and the ground
    class it must lie on."""
    road = roads[rng.integers(len(roads))]
    size = np.array(OBJECT_SIZES[name]) * rng.uniform(0.9, 1.1, 3)
    side = 1.0 if rng.random() < 0.5 else -1.0
    if name in LANE_MARGIN:  # right-hand traffic: the left half of the road drives against the road axis
        lat = side * rng.uniform(0.0, road.width / 2 - LANE_MARGIN[name])
        yaw, probe_lat, need = road.yaw + (np.pi if side > 0 else 0.0) + rng.normal(0.0, 0.05), lat, GROUND_ROAD
    elif name == "pedestrian":
        lat = side * (road.width / 2 + rng.uniform(0.4, road.walkway - 0.4))
        yaw, probe_lat, need = rng.uniform(-np.pi, np.pi), lat, GROUND_WALKWAY
    else:  # barrier (traffic cone alike): long side (its width) along the road edge
        lat = side * (road.width / 2 + rng.uniform(-0.2, 0.4))
        yaw, probe_lat, need = road.yaw + np.pi / 2 + rng.normal(0.0, 0.05), lat + side * 0.8, GROUND_WALKWAY
    along = rng.uniform(-half_length, half_length)
    axis = np.array([math.cos(road.yaw), math.sin(road.yaw)])
    normal = np.array([-axis[1], axis[0]])
    centre = along * axis + (road.offset + lat) * normal
    probe = along * axis + (road.offset + probe_lat) * normal
    yaw = (yaw + np.pi) % (2 * np.pi) - np.pi
    box = np.array([centre[0], centre[1], size[2] / 2, size[0], size[1], size[2], yaw])
    return box, probe, need


def _footprint(box: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """BEV corners [4, 2] of a box footprint grown by `grow` on every side."""
    c, s = math.cos(box[6]), math.sin(box[6])
    hl, hw = box[3] / 2 + grow, box[4] / 2 + grow
    local = np.array([[hl, hw], [-hl, hw], [-hl, -hw], [hl, -hw]])
    return local @ np.array([[c, s], [-s, c]]) + box[:2]


def footprints_overlap(a: np.ndarray, b: np.ndarray, gap: float = 0.0) -> bool:
    """Separating-axis test of two box footprints, each grown by gap / 2."""
    pa, pb = _footprint(a, gap / 2), _footprint(b, gap / 2)
    for yaw in (a[6], a[6] + np.pi / 2, b[6], b[6] + np.pi / 2):
        axis = np.array([math.cos(yaw), math.sin(yaw)])
        ra, rb = pa @ axis, pb @ axis
        if ra.max() < rb.min() or rb.max() < ra.min():
            return False
    return True


def distance_to_footprint(box: np.ndarray, xy: Sequence[float] = (0.0, 0.0)) -> float:
    """Euclidean BEV distance from a point to a box footprint (0 inside)."""
    c, s = math.cos(box[6]), math.sin(box[6])
    dx, dy = xy[0] - box[0], xy[1] - box[1]
    q = np.abs([c * dx + s * dy, -s * dx + c * dy]) - np.asarray(box[3:5]) / 2
    return float(np.linalg.norm(np.maximum(q, 0.0)))


def generate_scene(rng: np.random.Generator, object_classes: Sequence[str], bev_limit: float,
                   min_objects: int, max_objects: int, road_half_length: float = ROAD_HALF_LENGTH) -> Scene:
    """Roads plus reject-sampled, non-overlapping objects whose centres satisfy |x|, |y| <= bev_limit and lie within
    road_half_length of their road's centre along it."""
    roads = _sample_roads(rng)
    scene = Scene(roads, np.zeros((0, 7)), np.zeros(0, dtype=np.int64), tuple(object_classes))
    freq = np.array([OBJECT_FREQUENCY[c] for c in object_classes])
    target = int(rng.integers(min_objects, max_objects + 1))
    boxes, labels = [], []
    for _ in range(40 * max(target, 1)):
        if len(boxes) >= target:
            break
        label = int(rng.choice(len(freq), p=freq / freq.sum()))
        box, probe, need = _propose_object(rng, object_classes[label], roads, road_half_length)
        if (np.abs(box[:2]).max() <= bev_limit and distance_to_footprint(box) > EGO_CLEARANCE
                and scene.ground_class(probe) == need and not any(footprints_overlap(box, b, BOX_GAP) for b in boxes)):
            boxes.append(box)
            labels.append(label)
    scene.boxes = np.array(boxes, dtype=np.float64).reshape(-1, 7)
    scene.labels = np.array(labels, dtype=np.int64)
    return scene


# ------------------------------------------------------------------------------------------------------ sensors


def map_masks(scene: Scene, map_classes: Sequence[str], xy: np.ndarray) -> np.ndarray:
    """{0, 1} float32 masks [C, ...] of the map classes at ego-frame points xy [..., 2] (any grid layout)."""
    ground = scene.ground_class(xy)
    return np.stack([ground == MAP_CLASS_TO_GROUND[c] for c in map_classes]).astype(np.float32)


def rasterise_map(scene: Scene, map_classes: Sequence[str], map_bound: tuple[float, float, float]) -> np.ndarray:
    """{0, 1} masks [C, n, n] sampled at cell centres; row = y, col = x, row/col 0 at map_bound[0]."""
    lo, hi, cell = map_bound
    n = int(round((hi - lo) / cell))
    centres = lo + (np.arange(n) + 0.5) * cell
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    return map_masks(scene, map_classes, np.stack([xx, yy], axis=-1))


def _face_colours(scene: Scene) -> np.ndarray:
    """Colour [M, 6, 3] of every box face: class colour times Lambert shading, the front (+length) face brighter."""
    yaw = scene.boxes[:, 6, None]
    nx, ny = FACE_NORMALS[:, 0], FACE_NORMALS[:, 1]
    normals = np.stack(np.broadcast_arrays(np.cos(yaw) * nx - np.sin(yaw) * ny, np.sin(yaw) * nx + np.cos(yaw) * ny,
                                           FACE_NORMALS[:, 2]), axis=-1)
    shade = (0.45 + 0.55 * np.clip(normals @ LIGHT_DIR, 0.0, None)) * np.where(np.arange(6) == 0, 1.25, 1.0)
    base = np.array([PALETTE[scene.object_classes[label]] for label in scene.labels]).reshape(-1, 1, 3)
    return base * shade[..., None]


def _pixel_region(box: np.ndarray, rig: CameraRig, cam: int) -> tuple[int, int, int, int] | None:
    """Conservative pixel rectangle (r0, r1, c0, c1) containing a box's image, None if it is behind the camera."""
    h, w = rig.image_size
    rot, trans = rig.camera2lidar[cam, :3, :3], rig.camera2lidar[cam, :3, 3]
    pts = (box_corners(box) - trans) @ rot
    if (pts[:, 2] <= 0.05).all():
        return None
    if (pts[:, 2] <= 0.05).any():
        return 0, h, 0, w
    uv = pts @ rig.intrinsics[cam].T
    uv = uv[:, :2] / uv[:, 2:]
    c0, r0 = np.floor(uv.min(0)).astype(int)
    c1, r1 = np.ceil(uv.max(0)).astype(int) + 1
    r0, r1, c0, c1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    return None if r0 >= r1 or c0 >= c1 else (r0, r1, c0, c1)


def render_cameras(scene: Scene, rig: CameraRig, rng: np.random.Generator,
                   rays: np.ndarray | None = None) -> np.ndarray:
    """Ray-traced uint8 RGB images [N, H, W, 3]: textured ground by map class, sky, z-buffered shaded boxes."""
    h, w = rig.image_size
    rays = (rig.ray_directions() if rays is None else rays).reshape(-1, h, w, 3)
    face_colours = _face_colours(scene)
    images = []
    for cam in range(len(rig.camera2lidar)):
        origin, dirs = rig.camera2lidar[cam, :3, 3], rays[cam]
        t_best = ground_intersection(origin, dirs.reshape(-1, 3)).reshape(h, w)
        hit_box = np.full((h, w), -1)
        face = np.zeros((h, w), dtype=np.int64)
        for j, box in enumerate(scene.boxes):
            region = _pixel_region(box, rig, cam)
            if region is None:
                continue
            r0, r1, c0, c1 = region
            t, f = ray_box_intersection(origin, dirs[r0:r1, c0:c1].reshape(-1, 3), box)
            closer = t.reshape(r1 - r0, c1 - c0) < t_best[r0:r1, c0:c1]
            t_best[r0:r1, c0:c1][closer] = t.reshape(r1 - r0, c1 - c0)[closer]
            hit_box[r0:r1, c0:c1][closer] = j
            face[r0:r1, c0:c1][closer] = f.reshape(r1 - r0, c1 - c0)[closer]
        rgb = _background(scene, origin, dirs.reshape(-1, 3), t_best.ravel(), hit_box.ravel() < 0, rng)
        obj = hit_box.ravel() >= 0
        rgb[obj] = face_colours[hit_box.ravel()[obj], face.ravel()[obj]]
        images.append(np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8).reshape(h, w, 3))
    return np.stack(images)


def _background(scene: Scene, origin: np.ndarray, dirs: np.ndarray, t: np.ndarray, free: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Colours [R, 3] of rays not hitting a box: map-class ground with multiplicative texture noise, else sky."""
    rgb = np.empty((len(dirs), 3))
    ground = free & np.isfinite(t)
    xy = origin[:2] + t[ground, None] * dirs[ground, :2]
    texture = 1.0 + 0.06 * rng.standard_normal(len(xy))
    rgb[ground] = GROUND_COLORS[scene.ground_class(xy)] * texture[:, None]
    sky = free & ~ground
    mix = np.clip(dirs[sky, 2] / 0.6, 0.0, 1.0)[:, None]
    rgb[sky] = (1 - mix) * np.array(PALETTE["sky_horizon"]) + mix * np.array(PALETTE["sky_zenith"])
    return rgb


def lidar_directions(num_beams: int, points_per_beam: int) -> np.ndarray:
    """Unit ray directions [num_beams * points_per_beam, 3], beam-major, azimuth from +x CCW."""
    el = np.radians(np.linspace(*LIDAR_ELEVATION_DEG, num_beams))[:, None]
    az = (2 * np.pi * np.arange(points_per_beam) / points_per_beam)[None]
    dirs = np.stack(np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)), axis=-1)
    return dirs.reshape(-1, 3)


def simulate_lidar(scene: Scene, rng: np.random.Generator, dirs: np.ndarray,
                   point_cloud_range: Sequence[float]) -> np.ndarray:
    """Exact ground/box ray casting from LIDAR_ORIGIN with range noise; [P, 4] float32 (x, y, z, intensity)."""
    return simulate_lidar_hits(scene, rng, dirs, point_cloud_range)[0]


def simulate_lidar_hits(scene: Scene, rng: np.random.Generator, dirs: np.ndarray,
                        point_cloud_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """simulate_lidar's points plus, per point, the index of the box it hit (-1: ground), for per-box point counts."""
    t, hit_box = _cast(LIDAR_ORIGIN, dirs, scene.boxes)
    keep = np.isfinite(t)
    t, hit_box, dirs = t[keep], hit_box[keep], dirs[keep]
    t = t + LIDAR_RANGE_NOISE * rng.standard_normal(len(t))
    xyz = LIDAR_ORIGIN + t[:, None] * dirs
    obj_intensity = np.array([OBJECT_INTENSITY[scene.object_classes[k]] for k in scene.labels] + [0.0])
    intensity = np.where(hit_box >= 0, obj_intensity[hit_box], GROUND_INTENSITY[scene.ground_class(xyz[:, :2])])
    intensity = np.clip(intensity + 0.03 * rng.standard_normal(len(t)), 0.0, 1.0)
    lo, hi = np.asarray(point_cloud_range[:3]), np.asarray(point_cloud_range[3:])
    inside = ((xyz >= lo) & (xyz < hi)).all(axis=1)
    return np.concatenate([xyz[inside], intensity[inside, None]], axis=1).astype(np.float32), hit_box[inside]


# ------------------------------------------------------------------------------------------------------ dataset


def check_classes(object_classes: Sequence[str], map_classes: Sequence[str]) -> None:
    """Fail early, listing what the synthetic world has, when asked for classes it cannot generate."""
    unknown = set(object_classes) - set(OBJECT_SIZES) | set(map_classes) - set(MAP_CLASS_TO_GROUND)
    if unknown:
        raise ValueError(f"unsupported classes {sorted(unknown)}; objects: {sorted(OBJECT_SIZES)}, "
                         f"map: {sorted(MAP_CLASS_TO_GROUND)}")


def sample_rngs(seed: int, split: str, index: int) -> list[np.random.Generator]:
    """Independent streams (scene, camera noise, lidar noise) of sample `index`: a pure function of its arguments."""
    seq = np.random.SeedSequence([seed, zlib.crc32(split.encode()), index])
    return [np.random.default_rng(s) for s in seq.spawn(3)]


class SyntheticBEVDataset(Dataset):
    """Multi-camera + lidar BEV samples; sample i is a pure function of (seed, split, i) and cached after first use."""

    def __init__(self, num_samples: int, seed: int = 0, split: str = "train",
                 object_classes: Sequence[str] = ("car", "pedestrian", "barrier"),
                 map_classes: Sequence[str] = ("drivable_area", "walkway"),
                 point_cloud_range: Sequence[float] = (-25.6, -25.6, -1.0, 25.6, 25.6, 3.0),
                 map_bound: tuple[float, float, float] = (-25.6, 25.6, 0.8),
                 image_size: tuple[int, int] = (96, 160), num_cameras: int = 4, num_beams: int = 32,
                 points_per_beam: int = 360, min_objects: int = 4, max_objects: int = 12) -> None:
        check_classes(object_classes, map_classes)
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.CLASSES = tuple(object_classes)
        self._map_classes = tuple(map_classes)
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.map_bound = tuple(float(v) for v in map_bound)
        self.min_objects, self.max_objects = min_objects, max_objects
        self.flag = np.zeros(num_samples, dtype=np.uint8)  # mmdet's GroupSampler groups by this
        self.rig = make_camera_rig(num_cameras, tuple(image_size))
        self._camera_rays = self.rig.ray_directions()
        self._lidar_rays = lidar_directions(num_beams, points_per_beam)
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    @property
    def object_classes(self) -> tuple[str, ...]:
        """Detection class names; gt/pred labels index into this."""
        return self.CLASSES

    @property
    def map_classes(self) -> tuple[str, ...]:
        """Map class names; mask channel c is map_classes[c]."""
        return self._map_classes

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> Scene:
        """The scene description of sample `index` (cheap: no rendering)."""
        bev_limit = min(abs(v) for v in self.point_cloud_range[:2] + self.point_cloud_range[3:5]) - RANGE_MARGIN
        return generate_scene(sample_rngs(self.seed, self.split, index)[0], self.CLASSES, bev_limit,
                              self.min_objects, self.max_objects)

    def gt_masks(self, index: int) -> np.ndarray:
        """Ground-truth BEV masks [C_map, Hm, Wm] of sample `index`."""
        return rasterise_map(self.scene(index), self._map_classes, self.map_bound)

    def _generate(self, index: int) -> dict[str, np.ndarray]:
        """Render one sample into compact arrays (uint8 images) for the cache."""
        _, cam_rng, lidar_rng = sample_rngs(self.seed, self.split, index)
        scene = self.scene(index)
        return {
            "img": render_cameras(scene, self.rig, cam_rng, self._camera_rays),
            "points": simulate_lidar(scene, lidar_rng, self._lidar_rays, self.point_cloud_range),
            "gt_bboxes_3d": scene.boxes.astype(np.float32),
            "gt_labels_3d": scene.labels,
            "gt_masks_bev": rasterise_map(scene, self._map_classes, self.map_bound),
        }

    def __getitem__(self, index: int) -> dict:
        """One sample per docs/contract.md; tensors are fresh copies, so callers may modify them."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index = index % self.num_samples
        if index not in self._cache:
            self._cache[index] = self._generate(index)
        raw = self._cache[index]
        img = (raw["img"].astype(np.float32) / 255.0 - IMG_MEAN) / IMG_STD
        intrinsics = np.tile(np.eye(4, dtype=np.float32), (len(img), 1, 1))
        intrinsics[:, :3, :3] = self.rig.intrinsics
        return {
            "img": torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2))),
            "camera_intrinsics": torch.from_numpy(intrinsics),
            "camera2lidar": torch.from_numpy(self.rig.camera2lidar.astype(np.float32)),
            "points": torch.from_numpy(raw["points"].copy()),
            "gt_bboxes_3d": torch.from_numpy(raw["gt_bboxes_3d"].copy()),
            "gt_labels_3d": torch.from_numpy(raw["gt_labels_3d"].copy()),
            "gt_masks_bev": torch.from_numpy(raw["gt_masks_bev"].copy()),
            "metas": {"index": index},
        }

    def evaluate(self, results: Sequence[dict], **_: object) -> dict[str, float]:
        """nuScenes-style detection + BEVFusion-style map metrics; extra kwargs (mmdet's logger etc.) are ignored."""
        if len(results) != len(self):
            raise ValueError(f"expected one result per sample ({len(self)}), got {len(results)}")
        scenes = [self.scene(i) for i in range(len(self))]
        metrics = evaluate_detection(
            [_field(r, "boxes_3d", (7,)) for r in results], [_field(r, "scores_3d", ()) for r in results],
            [_field(r, "labels_3d", ()).astype(np.int64) for r in results],
            [s.boxes for s in scenes], [s.labels for s in scenes], self.CLASSES)
        gt_masks = [rasterise_map(s, self._map_classes, self.map_bound) for s in scenes]
        pred_masks = [_field(r, "masks_bev", g.shape[1:], rows=len(g)) for r, g in zip(results, gt_masks, strict=True)]
        metrics.update(evaluate_segmentation(pred_masks, gt_masks, self._map_classes))
        return metrics


def _field(result: dict, key: str, trailing: tuple[int, ...], rows: int = 0) -> np.ndarray:
    """result[key] as float64 numpy [K, *trailing]; missing or empty gives `rows` zero rows; bad shapes raise."""
    value = result.get(key)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if value is None or np.size(value) == 0:
        return np.zeros((rows, *trailing))
    value = np.asarray(value, dtype=np.float64)
    if value.shape[1:] != tuple(trailing) or (rows and len(value) != rows):
        raise ValueError(f"result field {key!r} has shape {value.shape}, expected [{rows or 'K'}, *{trailing}]")
    return value


def collate(samples: Sequence[dict]) -> dict:
    """Batch per docs/contract.md: stack fixed-shape tensors, keep variable-size fields as lists."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("img", "camera_intrinsics", "camera2lidar",
                                                               "gt_masks_bev")}
    batch.update({k: [s[k] for s in samples] for k in ("points", "gt_bboxes_3d", "gt_labels_3d", "metas")})
    return batch
