"""Plain-torch stand-ins for the mmcv.cnn helpers BEVFusion builds its conv stacks with."""
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def bn_kwargs(norm_cfg: Mapping[str, Any] | None) -> dict:
    """BatchNorm eps/momentum from an mmcv-style norm_cfg, so BEVFusion's YAML values (eps 1e-3, ...) carry over."""
    return {key: norm_cfg[key] for key in ("eps", "momentum") if norm_cfg and key in norm_cfg}


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 norm_cfg: Mapping[str, Any] | None = None) -> list[nn.Module]:
    """Conv (no bias) + BN + ReLU as a layer list, spliced into nn.Sequential like BEVFusion's hand-built stacks."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels, **bn_kwargs(norm_cfg)),
        nn.ReLU(inplace=True),
    ]


class ConvModule(nn.Module):
    """mmcv ConvModule (conv -> bn -> ReLU) with its attribute names, so state-dict keys read like BEVFusion's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels, **bn_kwargs(norm_cfg))
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv, normalise, activate."""
        return self.activate(self.bn(self.conv(x)))
