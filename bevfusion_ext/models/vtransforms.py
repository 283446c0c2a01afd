"""Camera-to-BEV view transform: BEVFusion's DepthLSSTransform with an ONNX-exportable scatter_add BEV pool.

Kept from BEVFusion on purpose: the depthnet output is D depth bins + C context channels (a channel contract a pruner
must not break), depth x context is an outer product, and ``frustum`` / ``dx`` / ``bx`` / ``nx`` are frozen
``nn.Parameter`` s (``requires_grad=False``; ``nx`` is int64) that appear in ``parameters()`` and the state dict.
"""
from collections.abc import Sequence

import torch
from torch import nn

from ..deploy.kernels import bev_pool, create_frustum, depth_image, gen_dx_bx, get_geometry
from .common import conv_bn_relu
from .registry import MODELS

Bound = Sequence[float]


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
        return nn.Parameter(create_frustum(self.image_size, self.feature_size, self.dbound), requires_grad=False)

    def get_geometry(self, camera2lidar: torch.Tensor, camera_intrinsics: torch.Tensor) -> torch.Tensor:
        """Ego-frame xyz [B, N, D, fH, fW, 3] of every frustum point: unproject with K^-1, move with camera2lidar."""
        return get_geometry(self.frustum, camera2lidar, camera_intrinsics)

    def depth_image(self, points: Sequence[torch.Tensor], camera_intrinsics: torch.Tensor,
                    camera2lidar: torch.Tensor) -> torch.Tensor:
        """Sparse lidar depth [B, N, 1, iH, iW] per camera (nearest point wins a pixel, 0 where no point lands)."""
        return depth_image(points, camera_intrinsics, camera2lidar, self.image_size)

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
