"""BEVFusion's camera neck: top-down FPN that concatenates (not adds) the upsampled coarser level."""
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import ConvModule
from .registry import MODELS


@MODELS.register_module()
class GeneralizedLSSFPN(nn.Module):
    """upsample(coarser) -> cat(lateral input, upsampled) -> 1x1 lateral conv -> 3x3 fpn conv, from the top down.

    As in BEVFusion, the top input is only concatenated (no conv of its own), so n inputs give n-1 outputs and the
    camera encoder uses the finest one; ``num_outs`` is kept for config compatibility.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, norm_cfg: Mapping[str, Any] | None = None,
                 upsample_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.start_level = start_level
        self.end_level = len(self.in_channels) - 1 if end_level == -1 else end_level
        self.upsample_cfg = dict(upsample_cfg or {"mode": "bilinear", "align_corners": False})
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(start_level, self.end_level):
            coarser = self.in_channels[i + 1] if i == self.end_level - 1 else out_channels
            self.lateral_convs.append(ConvModule(self.in_channels[i] + coarser, out_channels, 1, norm_cfg=norm_cfg))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, norm_cfg=norm_cfg))

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Multi-scale maps (fine to coarse) -> fused maps for levels start_level .. end_level-1."""
        assert len(inputs) == len(self.in_channels), (len(inputs), self.in_channels)
        laterals = list(inputs[self.start_level:self.end_level + 1])
        for i in range(len(laterals) - 2, -1, -1):
            up = F.interpolate(laterals[i + 1], size=laterals[i].shape[2:], **self.upsample_cfg)
            laterals[i] = self.fpn_convs[i](self.lateral_convs[i](torch.cat([laterals[i], up], dim=1)))
        return tuple(laterals[:-1])
