"""BEVFusion's ConvFuser: concatenate the camera and lidar BEV maps and mix them with one conv."""
from collections.abc import Sequence

import torch
from torch import nn

from .common import conv_bn_relu
from .registry import MODELS


@MODELS.register_module()
class ConvFuser(nn.Sequential):
    """cat(inputs, dim=1) -> conv3x3 (no bias) -> BN -> ReLU; an nn.Sequential so keys read fuser.0/1 like BEVFusion."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        super().__init__(*conv_bn_relu(sum(self.in_channels), out_channels))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """BEV maps in encoder order (camera, lidar) -> fused BEV map."""
        return super().forward(torch.cat(list(inputs), dim=1))
