"""The computations between the ONNX parts, in plain torch: the model code calls these same functions, so the deployed
frame and the PyTorch model share one implementation (CUDA kernels on the Orin in CUDA-BEVFusion).

camera: frustum -> geometry (once per calibration) -> BEV pool indices; lidar depth image per frame.
lidar: dense voxelization per frame. head.object: box decoding, score threshold, top-k, optional circle NMS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Bound = Sequence[float]


def gen_dx_bx(xbound: Bound, ybound: Bound, zbound: Bound) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell size, first cell centre and cell count per axis from (start, stop, step) bounds, as BEVFusion names them."""
    bounds = (xbound, ybound, zbound)
    dx = torch.tensor([b[2] for b in bounds], dtype=torch.float32)
    bx = torch.tensor([b[0] + b[2] / 2.0 for b in bounds], dtype=torch.float32)
    nx = torch.tensor([round((b[1] - b[0]) / b[2]) for b in bounds], dtype=torch.long)
    return dx, bx, nx


def create_frustum(image_size: Sequence[int], feature_size: Sequence[int], dbound: Bound) -> torch.Tensor:
    """(u, v, depth) of every [D, fH, fW] frustum point; u, v in input-image pixels (pixel centres at integers)."""
    (iH, iW), (fH, fW) = image_size, feature_size
    ds = torch.arange(*dbound, dtype=torch.float).view(-1, 1, 1).expand(-1, fH, fW)
    D = ds.shape[0]
    xs = torch.linspace(0, iW - 1, fW, dtype=torch.float).view(1, 1, fW).expand(D, fH, fW)
    ys = torch.linspace(0, iH - 1, fH, dtype=torch.float).view(1, fH, 1).expand(D, fH, fW)
    return torch.stack((xs, ys, ds), -1)


def get_geometry(frustum: torch.Tensor, camera2lidar: torch.Tensor, camera_intrinsics: torch.Tensor) -> torch.Tensor:
    """Ego-frame xyz [B, N, D, fH, fW, 3] of every frustum point: unproject with K^-1, move with camera2lidar."""
    B, N = camera2lidar.shape[:2]
    points = torch.cat((frustum[..., :2] * frustum[..., 2:3], frustum[..., 2:3]), -1)
    combine = camera2lidar[..., :3, :3].matmul(torch.inverse(camera_intrinsics[..., :3, :3]))
    points = combine.view(B, N, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1)).squeeze(-1)
    return points + camera2lidar[..., :3, 3].view(B, N, 1, 1, 1, 3)


@torch.no_grad()
def depth_image(points: Sequence[torch.Tensor], camera_intrinsics: torch.Tensor, camera2lidar: torch.Tensor,
                image_size: Sequence[int]) -> torch.Tensor:
    """Sparse lidar depth [B, N, 1, iH, iW] per camera (nearest point wins a pixel, 0 where no point lands)."""
    B, N = camera2lidar.shape[:2]
    iH, iW = image_size
    lidar2image = camera_intrinsics.matmul(torch.inverse(camera2lidar))
    depth = camera2lidar.new_zeros(B, N * iH * iW)
    for b, pts in enumerate(points):
        cam = lidar2image[b, :, :3, :3].matmul(pts[:, :3].T) + lidar2image[b, :, :3, 3:4]
        dist = cam[:, 2]
        u = torch.floor(cam[:, 0] / dist.clamp(min=1e-5)).long()
        v = torch.floor(cam[:, 1] / dist.clamp(min=1e-5)).long()
        on_img = (dist > 1e-5) & (u >= 0) & (u < iW) & (v >= 0) & (v < iH)
        camera = torch.arange(N, device=dist.device).view(N, 1).expand_as(u)
        flat = (camera * iH + v) * iW + u
        depth[b].scatter_reduce_(0, flat[on_img], dist[on_img], reduce="amin", include_self=False)
    return depth.view(B, N, 1, iH, iW)


def bev_pool_index(geom: torch.Tensor, dx: torch.Tensor, bx: torch.Tensor, nx: torch.Tensor) -> torch.Tensor:
    """Flat (batch, z, y, x) cell of every frustum point; points outside the grid go to one extra trash cell.

    The trash cell keeps every shape static (no boolean filtering), so the pool exports to ONNX as one
    ScatterElements(add). geom is [B, ..., 3] in metres; the result is int64 [B * prod(...)].
    """
    num_x, num_y, num_z = (int(n) for n in nx.tolist())
    cell = torch.floor((geom - (bx - dx / 2.0)) / dx).long()
    ix, iy, iz = cell.unbind(-1)
    valid = (ix >= 0) & (ix < num_x) & (iy >= 0) & (iy < num_y) & (iz >= 0) & (iz < num_z)
    batch = torch.arange(geom.shape[0], device=geom.device).view(-1, *([1] * (ix.dim() - 1)))
    flat = ((batch * num_z + iz) * num_y + iy) * num_x + ix
    trash = geom.shape[0] * num_z * num_y * num_x
    return torch.where(valid, flat, torch.full_like(flat, trash)).flatten()


def bev_pool(geom: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, bx: torch.Tensor, nx: torch.Tensor) -> torch.Tensor:
    """Sum frustum features x [B, N, D, fH, fW, C] into BEV cells -> [B, nz*C, ny, nx] (row = y, col = x).

    Uses Tensor.scatter_add (ONNX ScatterElements reduction=add, exact with repeated indices); index_add / index_put
    export silently wrong with the TorchScript exporter.
    """
    B, C = x.shape[0], x.shape[-1]
    num_x, num_y, num_z = (int(n) for n in nx.tolist())
    cells = B * num_z * num_y * num_x
    index = bev_pool_index(geom, dx, bx, nx)
    feats = x.reshape(-1, C)
    pooled = feats.new_zeros(cells + 1, C).scatter_add(0, index.unsqueeze(1).expand(-1, C), feats)[:cells]
    pooled = pooled.view(B, num_z, num_y, num_x, C).permute(0, 1, 4, 2, 3)
    return pooled.reshape(B, num_z * C, num_y, num_x)


@dataclass(frozen=True)
class BEVPoolPlan:
    """The BEV pool of one calibration, precomputed as CUDA-BEVFusion does: per in-grid frustum point its depth-bin
    entry, its context pixel and its cell, sorted by cell (stable, so each cell sums in the model's order)."""

    depth_index: torch.Tensor  # into depth_probs [N, D, fH, fW] flattened
    pixel_index: torch.Tensor  # into context [N, fH, fW] flattened (channels last)
    cell: torch.Tensor  # flat (z, y, x) cell
    shape: tuple[int, int, int]  # (nz, ny, nx)

    @classmethod
    def from_geometry(cls, geom: torch.Tensor, dx: torch.Tensor, bx: torch.Tensor, nx: torch.Tensor) -> BEVPoolPlan:
        """geom [1, N, D, fH, fW, 3] (one frame's calibration) -> the plan; out-of-grid points are dropped here."""
        _, N, D, fH, fW, _ = geom.shape
        index = bev_pool_index(geom, dx, bx, nx)
        cells = int(nx.prod())
        keep = torch.nonzero(index < cells).squeeze(1)
        keep = keep[torch.argsort(index[keep], stable=True)]
        n, rest = keep.div(D * fH * fW, rounding_mode="floor"), keep % (fH * fW)
        num_x, num_y, num_z = (int(v) for v in nx.tolist())
        return cls(keep, n * fH * fW + rest, index[keep], (num_z, num_y, num_x))

    def __call__(self, depth_probs: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """depth_probs [N, D, fH, fW], context [N, C, fH, fW] -> camera_bev_pooled [1, nz*C, ny, nx]."""
        C = context.shape[1]
        nz, ny, nx = self.shape
        feats = context.permute(0, 2, 3, 1).reshape(-1, C)[self.pixel_index]
        feats = depth_probs.reshape(-1)[self.depth_index].unsqueeze(1) * feats
        pooled = feats.new_zeros(nz * ny * nx, C).index_add_(0, self.cell, feats)
        return pooled.view(1, nz, ny, nx, C).permute(0, 1, 4, 2, 3).reshape(1, nz * C, ny, nx)


@torch.no_grad()
def voxelize_dense(points: Sequence[torch.Tensor], point_cloud_range: Sequence[float], voxel_size: Sequence[float],
                   point_dims: int) -> torch.Tensor:
    """Point clouds [P_i, >= point_dims] -> dense voxel grid [B, nz * (point_dims + 1), ny, nx] (row = y, col = x).

    Per voxel: mean point offset from the voxel centre in voxel units (3), mean of the extra point features and
    log(1 + count); the z slices are folded into channels.
    """
    lo, hi = point_cloud_range[:3], point_cloud_range[3:]
    nx, ny, nz = (round((b - a) / s) for a, b, s in zip(lo, hi, voxel_size, strict=True))
    cells = len(points) * nz * ny * nx
    pts = torch.cat([p[:, :point_dims] for p in points])
    batch = torch.cat([torch.full((len(p),), b, dtype=torch.long, device=pts.device) for b, p in enumerate(points)])
    rel = (pts[:, :3] - pts.new_tensor(point_cloud_range[:3])) / pts.new_tensor(voxel_size)
    cell = torch.floor(rel).long()
    ix, iy, iz = cell.unbind(1)
    valid = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (iz >= 0) & (iz < nz)
    flat = torch.where(valid, ((batch * nz + iz) * ny + iy) * nx + ix, cells)
    feats = torch.cat([rel - cell - 0.5, pts[:, 3:], torch.ones_like(pts[:, :1])], dim=1)
    sums = pts.new_zeros(cells + 1, feats.shape[1]).scatter_add_(0, flat[:, None].expand_as(feats), feats)
    count = sums[:cells, -1:]
    voxels = torch.cat([sums[:cells, :-1] / count.clamp(min=1), torch.log1p(count)], dim=1)
    voxels = voxels.view(len(points), nz, ny, nx, -1).permute(0, 1, 4, 2, 3)
    return voxels.reshape(len(points), nz * (point_dims + 1), ny, nx)


def decode_boxes(center: torch.Tensor, height: torch.Tensor, dim: torch.Tensor, rot: torch.Tensor,
                 origin: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """TransFusion's per-query outputs ([B, c, P] each; centre in head-grid cells, log sizes, (sin, cos) yaw) ->
    ego-frame boxes [B, P, 7] (x, y, z, l, w, h, yaw)."""
    xy = center.transpose(1, 2) * cell.to(center) + origin.to(center)
    rot = rot.transpose(1, 2)
    yaw = torch.atan2(rot[..., :1], rot[..., 1:2])
    return torch.cat([xy, height.transpose(1, 2), dim.transpose(1, 2).exp(), yaw], dim=-1)


def box_scores(class_logits: torch.Tensor, labels: torch.Tensor, proposal_scores: torch.Tensor) -> torch.Tensor:
    """Query score = sigmoid(class logit of its proposal class) [B, classes, P] x heatmap probability [B, P]."""
    return class_logits.sigmoid().gather(1, labels.unsqueeze(1)).squeeze(1) * proposal_scores


def circle_nms(boxes: torch.Tensor, labels: torch.Tensor, radius: float) -> torch.Tensor:
    """Indices of boxes (given best first) with no better box of the same class within `radius` metres of their
    centre (CenterPoint's circle NMS)."""
    keep: list[int] = []
    for i in range(len(boxes)):
        if not any(labels[j] == labels[i] and torch.dist(boxes[i, :2], boxes[j, :2]) <= radius for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def select_boxes(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, score_threshold: float,
                 max_num: int, nms_radius: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample's queries -> (boxes [K, 7], scores [K], labels [K]) above the threshold, best first, K <= max_num;
    with nms_radius, circle NMS first (TransFusion itself needs none: its proposals are heatmap local maxima)."""
    keep = torch.nonzero(scores >= score_threshold).squeeze(1)
    order = keep[scores[keep].argsort(descending=True)]
    if nms_radius is not None:
        order = order[circle_nms(boxes[order], labels[order], nms_radius)]
    order = order[:max_num]
    return boxes[order], scores[order], labels[order]
