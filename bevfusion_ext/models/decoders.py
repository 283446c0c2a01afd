"""BEV decoder: SECOND (strided conv stages) and SECONDFPN (per-level deconv/conv + BN + ReLU, concatenated)."""
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from .common import bn_kwargs, conv_bn_relu
from .registry import MODELS


@MODELS.register_module()
class SECOND(nn.Module):
    """Stage i: conv3x3 stride layer_strides[i] then layer_nums[i] conv3x3, all conv-BN-ReLU; returns every stage."""

    def __init__(self, in_channels: int = 128, out_channels: Sequence[int] = (128, 128, 256),
                 layer_nums: Sequence[int] = (3, 5, 5), layer_strides: Sequence[int] = (2, 2, 2),
                 norm_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        assert len(out_channels) == len(layer_nums) == len(layer_strides)
        self.blocks = nn.ModuleList()
        channels = [in_channels, *out_channels]
        for i, (num, stride) in enumerate(zip(layer_nums, layer_strides, strict=True)):
            layers = conv_bn_relu(channels[i], channels[i + 1], stride=stride, norm_cfg=norm_cfg)
            for _ in range(num):
                layers += conv_bn_relu(channels[i + 1], channels[i + 1], norm_cfg=norm_cfg)
            self.blocks.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Fused BEV map -> one map per stage (progressively strided)."""
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return tuple(outs)


@MODELS.register_module()
class SECONDFPN(nn.Module):
    """Bring every SECOND stage to one resolution (ConvTranspose2d for stride > 1, strided Conv2d for stride <= 1)."""

    def __init__(self, in_channels: Sequence[int] = (128, 128, 256), out_channels: Sequence[int] = (256, 256, 256),
                 upsample_strides: Sequence[float] = (1, 2, 4), norm_cfg: Mapping[str, Any] | None = None,
                 use_conv_for_no_stride: bool = False) -> None:
        super().__init__()
        assert len(in_channels) == len(out_channels) == len(upsample_strides)
        self.in_channels = list(in_channels)
        self.out_channels = list(out_channels)
        self.deblocks = nn.ModuleList()
        for cin, cout, stride in zip(in_channels, out_channels, upsample_strides, strict=True):
            if stride > 1 or (stride == 1 and not use_conv_for_no_stride):
                up = nn.ConvTranspose2d(cin, cout, int(stride), stride=int(stride), bias=False)
            else:
                down = int(1 / Fraction(stride).limit_denominator(64))
                up = nn.Conv2d(cin, cout, down, stride=down, bias=False)
            self.deblocks.append(nn.Sequential(up, nn.BatchNorm2d(cout, **bn_kwargs(norm_cfg)), nn.ReLU(inplace=True)))

    def forward(self, x: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-stage maps -> [one map with sum(out_channels) channels], a list as BEVFusion's heads expect."""
        assert len(x) == len(self.deblocks), (len(x), len(self.deblocks))
        return [torch.cat([deblock(feat) for deblock, feat in zip(self.deblocks, x, strict=True)], dim=1)]
