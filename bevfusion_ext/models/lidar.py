"""Lidar branch: dense voxelization + a dense 2D BEV conv encoder.

This stands in for BEVFusion's hard ``Voxelization`` (CUDA op) + spconv ``SparseEncoder``, which need compiled
CUDA code: points are scattered into a dense [B, C, ny, nx] grid (height slices folded into channels) and encoded with
ordinary Conv2d blocks. On Orin these two stages stay CUDA/plugin code in CUDA-BEVFusion too; compression tools see
only plain convs here.
"""
from collections.abc import Sequence

import torch
from torch import nn

from ..deploy.kernels import voxelize_dense
from .common import conv_bn_relu
from .registry import MODELS


@MODELS.register_module()
class DenseVoxelization(nn.Module):
    """Parameter-free scatter of points into a dense voxel grid, reduced to per-voxel means (voxelize_reduce).

    Per voxel: mean point offset from the voxel centre in voxel units (3), mean of the extra point features
    (``point_dims - 3``, e.g. intensity) and log(1 + count); the z slices are folded into channels, so the output is
    [B, nz * (point_dims + 1), ny, nx] with row = y and col = x.
    """

    def __init__(self, point_cloud_range: Sequence[float], voxel_size: Sequence[float], point_dims: int = 4) -> None:
        super().__init__()
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.point_dims = point_dims
        lo, hi = self.point_cloud_range[:3], self.point_cloud_range[3:]
        self.grid_size = tuple(round((b - a) / s) for a, b, s in zip(lo, hi, self.voxel_size, strict=True))
        self.out_channels = self.grid_size[2] * (point_dims + 1)

    def forward(self, points: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of [P_i, point_dims] point clouds -> dense grid [B, out_channels, ny, nx]."""
        return voxelize_dense(points, self.point_cloud_range, self.voxel_size, self.point_dims)


@MODELS.register_module()
class DenseLidarEncoder(nn.Module):
    """Dense 2D stand-in for BEVFusion's SparseEncoder: conv_input -> encoder_layers (stages) -> conv_out.

    Stage i is conv3x3-BN-ReLU blocks with channels ``encoder_channels[i]``; its first conv has stride
    ``encoder_strides[i]``.
    """

    def __init__(self, in_channels: int, base_channels: int = 16, output_channels: int = 128,
                 encoder_channels: Sequence[Sequence[int]] = ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
                 encoder_strides: Sequence[int] = (1, 2, 2, 2)) -> None:
        super().__init__()
        assert len(encoder_channels) == len(encoder_strides), (encoder_channels, encoder_strides)
        self.conv_input = nn.Sequential(*conv_bn_relu(in_channels, base_channels))
        self.encoder_layers = nn.ModuleList()
        channels = base_channels
        for stage, stride in zip(encoder_channels, encoder_strides, strict=True):
            layers = []
            for i, out in enumerate(stage):
                layers += conv_bn_relu(channels, out, stride=stride if i == 0 else 1)
                channels = out
            self.encoder_layers.append(nn.Sequential(*layers))
        self.conv_out = nn.Sequential(*conv_bn_relu(channels, output_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense voxel grid [B, in_channels, ny, nx] -> lidar BEV features [B, output_channels, ny/s, nx/s]."""
        x = self.conv_input(x)
        for stage in self.encoder_layers:
            x = stage(x)
        return self.conv_out(x)
