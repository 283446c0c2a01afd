"""Camera-to-BEV view transform: BEVFusion's DepthLSSTransform with an ONNX-exportable scatter_add BEV pool.

Kept from BEVFusion on purpose: the depthnet output is D depth bins + C context channels (a channel contract a pruner
must not break), depth x context is an outer product, and ``frustum`` / ``dx`` / ``bx`` / ``nx`` are frozen
``nn.Parameter`` s (``requires_grad=False``; ``nx`` is int64) that appear in ``parameters()`` and the state dict.
"""
from collections.abc import Sequence

import torch
from torch import nn

from .common import conv_bn_relu
from .registry import MODELS

Bound = Sequence[float]


def gen_dx_bx(xbound: Bound, ybound: Bound, zbound: Bound) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell size, first cell centre and cell count per axis from (start, stop, step) bounds, as BEVFusion names them."""
    bounds = (xbound, ybound, zbound)
    dx = torch.tensor([b[2] for b in bounds], dtype=torch.float32)
    bx = torch.tensor([b[0] + b[2] / 2.0 for b in bounds], dtype=torch.float32)
    nx = torch.tensor([round((b[1] - b[0]) / b[2]) for b in bounds], dtype=torch.long)
    return dx, bx, nx


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


@MODELS.register_module()
class DepthLSSTransform(nn.Module):
    """Lift image features with a lidar-depth-guided categorical depth, splat them onto the BEV grid, downsample.

    No image augmentation matrices: geometry comes from ``camera_intrinsics`` (K in the upper-left 3x3) and
    ``camera2lidar`` only. ``dtransform_channels`` (BEVFusion hard-codes 8, 32, 64) lets the tiny model shrink them.
    """

    def __init__(self, in_channels: int, out_channels: int, image_size: Sequence[int], feature_size: Sequence[int],
                 xbound: Bound, ybound: Bound, zbound: Bound, dbound: Bound, downsample: int = 1,
                 dtransform_channels: Sequence[int] = (8, 32, 64)) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.image_size = tuple(image_size)
        self.feature_size = tuple(feature_size)
        self.xbound, self.ybound, self.zbound, self.dbound = xbound, ybound, zbound, dbound
        assert self.image_size == (8 * self.feature_size[0], 8 * self.feature_size[1]), "features must be stride 8"
        dx, bx, nx = gen_dx_bx(xbound, ybound, zbound)
        assert nx[2] == 1, "zbound must give one height cell, as in BEVFusion's configs"
        self.dx = nn.Parameter(dx, requires_grad=False)
        self.bx = nn.Parameter(bx, requires_grad=False)
        self.nx = nn.Parameter(nx, requires_grad=False)
        self.C = out_channels
        self.frustum = self.create_frustum()
        self.D = self.frustum.shape[0]
        c1, c2, c3 = dtransform_channels
        self.dtransform = nn.Sequential(
            *conv_bn_relu(1, c1, 1), *conv_bn_relu(c1, c2, 5, stride=4), *conv_bn_relu(c2, c3, 5, stride=2)
        )
        self.depthnet = nn.Sequential(
            *conv_bn_relu(in_channels + c3, in_channels), *conv_bn_relu(in_channels, in_channels),
            nn.Conv2d(in_channels, self.D + self.C, 1),
        )
        assert downsample in (1, 2), downsample
        self.downsample = nn.Sequential(
            *conv_bn_relu(out_channels, out_channels), *conv_bn_relu(out_channels, out_channels, stride=downsample),
            *conv_bn_relu(out_channels, out_channels),
        ) if downsample > 1 else nn.Identity()

    def create_frustum(self) -> nn.Parameter:
        """(u, v, depth) of every [D, fH, fW] frustum point; u, v in input-image pixels (pixel centres at integers)."""
        (iH, iW), (fH, fW) = self.image_size, self.feature_size
        ds = torch.arange(*self.dbound, dtype=torch.float).view(-1, 1, 1).expand(-1, fH, fW)
        D = ds.shape[0]
        xs = torch.linspace(0, iW - 1, fW, dtype=torch.float).view(1, 1, fW).expand(D, fH, fW)
        ys = torch.linspace(0, iH - 1, fH, dtype=torch.float).view(1, fH, 1).expand(D, fH, fW)
        return nn.Parameter(torch.stack((xs, ys, ds), -1), requires_grad=False)

    def get_geometry(self, camera2lidar: torch.Tensor, camera_intrinsics: torch.Tensor) -> torch.Tensor:
        """Ego-frame xyz [B, N, D, fH, fW, 3] of every frustum point: unproject with K^-1, move with camera2lidar."""
        B, N = camera2lidar.shape[:2]
        points = torch.cat((self.frustum[..., :2] * self.frustum[..., 2:3], self.frustum[..., 2:3]), -1)
        combine = camera2lidar[..., :3, :3].matmul(torch.inverse(camera_intrinsics[..., :3, :3]))
        points = combine.view(B, N, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1)).squeeze(-1)
        return points + camera2lidar[..., :3, 3].view(B, N, 1, 1, 1, 3)

    @torch.no_grad()
    def depth_image(self, points: Sequence[torch.Tensor], camera_intrinsics: torch.Tensor,
                    camera2lidar: torch.Tensor) -> torch.Tensor:
        """Sparse lidar depth [B, N, 1, iH, iW] per camera (nearest point wins a pixel, 0 where no point lands)."""
        B, N = camera2lidar.shape[:2]
        iH, iW = self.image_size
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

    def get_cam_feats(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Image features [B, N, C_in, fH, fW] + depth image -> lifted features [B, N, D, fH, fW, C]."""
        B, N, C, fH, fW = x.shape
        d = self.dtransform(d.view(B * N, *d.shape[2:]))
        x = self.depthnet(torch.cat([d, x.view(B * N, C, fH, fW)], dim=1))
        depth = x[:, : self.D].softmax(dim=1)
        x = depth.unsqueeze(1) * x[:, self.D : (self.D + self.C)].unsqueeze(2)
        return x.view(B, N, self.C, self.D, fH, fW).permute(0, 1, 3, 4, 5, 2)

    def forward(self, img: torch.Tensor, points: Sequence[torch.Tensor], camera_intrinsics: torch.Tensor,
                camera2lidar: torch.Tensor) -> torch.Tensor:
        """Neck features [B, N, C_in, fH, fW] -> camera BEV features [B, C, ny / downsample, nx / downsample]."""
        geom = self.get_geometry(camera2lidar, camera_intrinsics)
        x = self.get_cam_feats(img, self.depth_image(points, camera_intrinsics, camera2lidar))
        return self.downsample(bev_pool(geom, x, self.dx, self.bx, self.nx))
