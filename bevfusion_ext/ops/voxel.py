"""CPU stand-in for BEVFusion's `voxel_layer` (mmdet3d/ops/voxel/src/voxelization_cuda.cu, scatter_points_cuda.cu).

BEVFusion's fork writes voxel coordinates in (x, y, z) order (upstream mmdet3d writes (z, y, x)); so does this.
Coordinates are computed in float32 as the kernel does: floor((p - range_min) / voxel_size), grid size
round((range_max - range_min) / voxel_size) with C rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["dynamic_point_to_voxel_backward", "dynamic_point_to_voxel_forward", "dynamic_voxelize", "hard_voxelize"]


def _grid_size(voxel_size: Sequence[float], coors_range: Sequence[float]) -> list[int]:
    """Voxels per axis, in float32 arithmetic and C's round-half-away-from-zero like the kernel."""
    size, low, high = (np.float32(v) for v in (voxel_size[:3], coors_range[:3], coors_range[3:6]))
    return [int(math.copysign(math.floor(abs(float(v)) + 0.5), v)) for v in (high - low) / size]


def _point_coords(points: Tensor, voxel_size: Sequence[float], coors_range: Sequence[float]) -> tuple[Tensor, Tensor]:
    """(x, y, z) voxel index of each point (int64) and which axes fall outside the grid (NaN counts as outside)."""
    low = torch.tensor([float(v) for v in coors_range[:3]], dtype=torch.float32).to(points.dtype)
    size = torch.tensor([float(v) for v in voxel_size[:3]], dtype=torch.float32).to(points.dtype)
    scaled = torch.floor((points[:, :3] - low) / size)
    grid = torch.tensor(_grid_size(voxel_size, coors_range), dtype=points.dtype)
    outside = ~((scaled >= 0) & (scaled < grid))
    return scaled.masked_fill(outside, 0).long(), outside


def dynamic_voxelize(points: Tensor, coors: Tensor, voxel_size: Sequence[float], coors_range: Sequence[float],
                     NDim: int = 3) -> None:
    """Write each point's (x, y, z) voxel to `coors`; out of range: -1 up to the first failing axis, as the kernel."""
    coords, outside = _point_coords(points, voxel_size, coors_range)
    first_bad = torch.where(outside.any(1), outside.int().argmax(1), -1)
    inside = ~outside.any(1)
    coors[inside] = coords[inside].to(coors.dtype)
    coors[torch.arange(NDim) <= first_bad[:, None]] = -1


def _first_come(key: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Per point: its voxel's rank by first appearance, and its rank among the earlier points of that voxel."""
    _, inverse = torch.unique(key, return_inverse=True)
    first = torch.zeros(int(inverse.max()) + 1 if len(key) else 0, dtype=torch.long)
    first.scatter_reduce_(0, inverse, order, "amin", include_self=False)
    voxel = torch.empty_like(first)
    voxel[first.argsort()] = torch.arange(len(first))
    voxel = voxel[inverse]
    counts = torch.bincount(voxel, minlength=len(first))
    by_voxel = torch.argsort(voxel, stable=True)
    slot = torch.empty_like(voxel)
    slot[by_voxel] = torch.arange(len(voxel)) - (torch.cumsum(counts, 0) - counts)[voxel[by_voxel]]
    return voxel, slot


def hard_voxelize(points: Tensor, voxels: Tensor, coors: Tensor, num_points_per_voxel: Tensor,
                  voxel_size: Sequence[float], coors_range: Sequence[float], max_points: int, max_voxels: int,
                  NDim: int = 3, deterministic: bool = True) -> int:
    """Fill voxels in order of first appearance, points in input order; extra points and voxels are dropped."""
    coords, outside = _point_coords(points, voxel_size, coors_range)
    kept = torch.nonzero(~outside.any(1)).squeeze(1)
    gx, gy, gz = _grid_size(voxel_size, coors_range)
    xyz = coords[kept]
    voxel, slot = _first_come((xyz[:, 0] * gy + xyz[:, 1]) * gz + xyz[:, 2], kept)
    take = (voxel < max_voxels) & (slot < max_points)
    voxels[voxel[take], slot[take]] = points[kept[take]].to(voxels.dtype)
    num = min(int(voxel.max()) + 1 if len(voxel) else 0, max_voxels)
    starts = slot == 0
    coors[voxel[starts & take]] = xyz[starts & take].to(coors.dtype)
    counts = torch.bincount(voxel, minlength=num)[:num]
    num_points_per_voxel[:num] = counts.clamp(max=max_points).to(num_points_per_voxel.dtype)
    return num


def dynamic_point_to_voxel_forward(feats: Tensor, coors: Tensor, reduce_type: str) -> list[Tensor]:
    """Reduce ('sum' | 'mean' | 'max') the features of points sharing a voxel; voxels sorted by coordinate."""
    if reduce_type not in ("sum", "mean", "max"):
        raise ValueError(f"do not support reduce type {reduce_type}")
    if len(feats) == 0:
        empty = coors.new_empty(0, dtype=torch.int32)
        return [feats.clone().detach(), coors.clone().detach(), empty, empty.clone()]
    clean = coors.masked_fill(coors.lt(0).any(-1, keepdim=True), -1)
    out_coors, coors_map, reduce_count = torch.unique(clean, dim=0, return_inverse=True, return_counts=True)
    if out_coors[0, 0] < 0:
        out_coors, reduce_count, coors_map = out_coors[1:], reduce_count[1:], coors_map - 1
    valid = coors_map >= 0
    fill = -math.inf if reduce_type == "max" else 0.0
    reduced = feats.new_full((len(out_coors), feats.shape[1]), fill)
    index = coors_map[valid, None].expand(-1, feats.shape[1])
    reduced.scatter_reduce_(0, index, feats[valid], "amax" if reduce_type == "max" else "sum")
    if reduce_type == "mean":
        reduced /= reduce_count[:, None].to(reduced.dtype)
    return [reduced, out_coors, coors_map.int(), reduce_count.int()]


def dynamic_point_to_voxel_backward(grad_feats: Tensor, grad_reduced_feats: Tensor, feats: Tensor,
                                    reduced_feats: Tensor, coors_idx: Tensor, reduce_count: Tensor,
                                    reduce_type: str) -> None:
    """Write the point gradients into `grad_feats`: sum copies, mean divides, max goes to the first arg-max point."""
    grad_feats.fill_(0)
    if len(feats) == 0 or len(reduced_feats) == 0:
        return
    valid = torch.nonzero(coors_idx >= 0).squeeze(1)
    voxel = coors_idx[valid].long()
    if reduce_type != "max":
        scale = reduce_count[voxel, None].to(grad_feats.dtype) if reduce_type == "mean" else 1
        grad_feats[valid] = grad_reduced_feats[voxel] / scale
        return
    hit = feats[valid] == reduced_feats[voxel]
    source = torch.full(reduced_feats.shape, len(feats), dtype=torch.long)
    source.scatter_reduce_(0, voxel[:, None].expand_as(hit), torch.where(hit, valid[:, None], len(feats)), "amin")
    found = source < len(feats)
    grad_feats[source[found], torch.nonzero(found)[:, 1]] = grad_reduced_feats[found]
