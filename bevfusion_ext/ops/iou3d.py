"""CPU stand-in for BEVFusion's `iou3d_cuda` (mmdet3d/ops/iou3d/src/iou3d.cpp, iou3d_kernel.cu), in torch.

Boxes are [x1, y1, x2, y2, r]: the axis-aligned rectangle rotated about its centre by -r (the kernel's
rotate_around_center). The overlap is the exact area of the convex intersection polygon, built as the kernel builds
it (corners of each box inside the other plus edge crossings, ordered by angle about their mean) but in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["boxes_iou_bev_gpu", "boxes_overlap_bev_gpu", "nms_gpu", "nms_normal_gpu"]

EPS = 1e-8  # the kernel's floor on the union
MARGIN = 1e-6  # a corner this close outside the other box counts as inside (collinear edges do not cross)
CHUNK = 1 << 16  # box pairs per vectorised step


def _corners(boxes: Tensor) -> Tensor:
    """[..., 4, 2] corners (x1y1, x2y1, x2y2, x1y2) rotated by -r about the centre, as the kernel places them."""
    x1, y1, x2, y2, r = boxes.unbind(-1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    x = torch.stack([x1, x2, x2, x1], -1) - cx[..., None]
    y = torch.stack([y1, y1, y2, y2], -1) - cy[..., None]
    cos, sin = torch.cos(r)[..., None], torch.sin(r)[..., None]
    return torch.stack([x * cos + y * sin + cx[..., None], -x * sin + y * cos + cy[..., None]], -1)


def _inside(points: Tensor, boxes: Tensor) -> Tensor:
    """Whether each of [P, n, 2] points lies in its [P, 5] box (within MARGIN), rotating it into the box frame."""
    x1, y1, x2, y2, r = (v[:, None] for v in boxes.unbind(-1))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    dx, dy = points[..., 0] - cx, points[..., 1] - cy
    cos, sin = torch.cos(r), torch.sin(r)
    x, y = dx * cos - dy * sin + cx, dx * sin + dy * cos + cy
    return (x > x1 - MARGIN) & (x < x2 + MARGIN) & (y > y1 - MARGIN) & (y < y2 + MARGIN)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """z of the cross product of [..., 2] vectors."""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _crossings(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """[P, 16, 2] points where an edge of a properly crosses an edge of b, and which of the 16 edge pairs do."""
    p0, p1 = a[:, :, None], a.roll(-1, 1)[:, :, None]
    q0, q1 = b[:, None], b.roll(-1, 1)[:, None]
    d, e = p1 - p0, q1 - q0
    s1, s2 = _cross(d, q0 - p0), _cross(d, q1 - p0)
    s3, s4 = _cross(e, p0 - q0), _cross(e, p1 - q0)
    proper = (s1 * s2 < 0) & (s3 * s4 < 0)
    t = (s3 / torch.where(proper, s3 - s4, torch.ones_like(s3)))[..., None]
    return (p0 + t * d).flatten(1, 2), proper.flatten(1)


def _overlap(a_boxes: Tensor, b_boxes: Tensor) -> Tensor:
    """Intersection area of [P, 5] box pairs, in float64."""
    a, b = _corners(a_boxes), _corners(b_boxes)
    crossing, proper = _crossings(a, b)
    points = torch.cat([crossing, a, b], 1)
    valid = torch.cat([proper, _inside(a, b_boxes), _inside(b, a_boxes)], 1)
    count = valid.sum(1, keepdim=True)
    centre = (points * valid[..., None]).sum(1) / count.clamp(min=1)
    angle = torch.atan2(points[..., 1] - centre[:, None, 1], points[..., 0] - centre[:, None, 0])
    order = torch.where(valid, angle, torch.inf).argsort(1)
    ring = points.gather(1, order[..., None].expand_as(points)) - points.gather(1, order[:, :1, None].expand(-1, 1, 2))
    edge = torch.arange(ring.shape[1] - 1) < count - 1
    return (_cross(ring[:, :-1], ring[:, 1:]) * edge).sum(1).abs() / 2


def _near(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Which pairs' circumscribed circles meet: the others cannot overlap."""
    centre_a, centre_b = (a[:, :2] + a[:, 2:4]) / 2, (b[:, :2] + b[:, 2:4]) / 2
    radius_a, radius_b = (a[:, 2:4] - a[:, :2]).norm(dim=1) / 2, (b[:, 2:4] - b[:, :2]).norm(dim=1) / 2
    return (centre_a[rows] - centre_b[cols]).norm(dim=1) <= radius_a[rows] + radius_b[cols] + MARGIN


def _pairwise(boxes_a: Tensor, boxes_b: Tensor, iou: bool) -> Tensor:
    """[N, M] overlap area (or BEV IoU) of every pair, float64, in chunks of CHUNK pairs that can overlap."""
    a, b = boxes_a.detach().cpu().double(), boxes_b.detach().cpu().double()
    rows, cols = torch.meshgrid(torch.arange(len(a)), torch.arange(len(b)), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    near = _near(a, b, rows, cols)
    area = a.new_zeros(len(rows))
    area[near] = torch.cat([_overlap(a[r], b[c]) for r, c in zip(rows[near].split(CHUNK), cols[near].split(CHUNK),
                                                                  strict=True)] + [a.new_zeros(0)])
    if iou:
        size_a, size_b = ((x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1]) for x in (a, b))
        area = area / (size_a[rows] + size_b[cols] - area).clamp(min=EPS)
    return area.view(len(a), len(b))


def boxes_overlap_bev_gpu(boxes_a: Tensor, boxes_b: Tensor, ans_overlap: Tensor) -> int:
    """Write the BEV intersection area of every (a, b) pair into `ans_overlap` [N, M]; returns 1 like the binding."""
    ans_overlap.copy_(_pairwise(boxes_a, boxes_b, iou=False))
    return 1


def boxes_iou_bev_gpu(boxes_a: Tensor, boxes_b: Tensor, ans_iou: Tensor) -> int:
    """Write the BEV IoU of every (a, b) pair into `ans_iou` [N, M]; returns 1 like the binding."""
    ans_iou.copy_(_pairwise(boxes_a, boxes_b, iou=True))
    return 1


def _iou_normal(boxes: Tensor) -> Tensor:
    """[N, N] axis-aligned IoU ignoring r, in float32 op for op like the kernel's iou_normal."""
    a, b = boxes.detach().cpu().float()[:, None], boxes.detach().cpu().float()[None]
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = width * height
    size_a, size_b = ((x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1]) for x in (a, b))
    return inter / (size_a + size_b - inter).clamp(min=EPS)


def _greedy(iou: Tensor, keep: Tensor, thresh: float) -> int:
    """Keep boxes in order unless a kept earlier box overlaps them by more than `thresh`; returns the count."""
    over = (iou.float() > torch.tensor(thresh, dtype=torch.float32)).numpy()
    removed = np.zeros(len(over), dtype=bool)
    kept = []
    for i in range(len(over)):
        if not removed[i]:
            kept.append(i)
            removed |= over[i]
    keep[: len(kept)] = torch.tensor(kept, dtype=keep.dtype)
    return len(kept)


def nms_gpu(boxes: Tensor, keep: Tensor, nms_overlap_thresh: float, device_id: int | None) -> int:
    """Rotated greedy NMS over boxes already sorted by score: kept indices into `keep`, returns how many."""
    return _greedy(_pairwise(boxes, boxes, iou=True), keep, nms_overlap_thresh)


def nms_normal_gpu(boxes: Tensor, keep: Tensor, nms_overlap_thresh: float, device_id: int | None) -> int:
    """Axis-aligned greedy NMS over boxes already sorted by score (r ignored): indices into `keep`, returns count."""
    return _greedy(_iou_normal(boxes), keep, nms_overlap_thresh)
