"""BEVFusion's BEV map segmentation head: resample the decoder's BEV map onto the map grid, classify every cell."""
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import conv_bn_relu
from .registry import MODELS
from .transfusion import sigmoid_focal_loss

Scope = Sequence[Sequence[float]]


class BEVGridTransform(nn.Module):
    """grid_sample from the input BEV extent to the output (map) extent; scopes are ((x0, x1, dx), (y0, y1, dy)).

    Follows the contract's layout (row = y, col = x). The sampling grid is a constant non-persistent buffer.
    """

    def __init__(self, *, input_scope: Scope, output_scope: Scope, prescale_factor: float = 1) -> None:
        super().__init__()
        self.prescale_factor = prescale_factor
        (ix0, ix1, _), (iy0, iy1, _) = input_scope
        (ox0, ox1, odx), (oy0, oy1, ody) = output_scope
        rows, cols = torch.meshgrid(self.normalised_centres(oy0, oy1, ody, iy0, iy1),
                                    self.normalised_centres(ox0, ox1, odx, ix0, ix1), indexing="ij")
        self.register_buffer("grid", torch.stack([cols, rows], dim=-1).unsqueeze(0), persistent=False)

    @staticmethod
    def normalised_centres(start: float, stop: float, step: float, in_start: float, in_stop: float) -> torch.Tensor:
        """Output cell centres in grid_sample's [-1, 1] coordinates of the input extent (align_corners=False)."""
        centres = start + (torch.arange(round((stop - start) / step), dtype=torch.float32) + 0.5) * step
        return (centres - in_start) / (in_stop - in_start) * 2 - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] on the input extent -> [B, C, Hm, Wm] on the output extent (bilinear)."""
        if self.prescale_factor != 1:
            x = F.interpolate(x, scale_factor=self.prescale_factor, mode="bilinear", align_corners=False)
        grid = self.grid.expand(x.shape[0], -1, -1, -1).to(x.dtype)
        return F.grid_sample(x, grid, mode="bilinear", align_corners=False)


@MODELS.register_module()
class BEVSegmentationHead(nn.Module):
    """Grid transform + (conv3x3-BN-ReLU) x2 + conv1x1 classifier; one sigmoid channel per map class."""

    def __init__(self, in_channels: int, grid_transform: Mapping[str, Any], classes: Sequence[str],
                 loss: str = "focal") -> None:
        super().__init__()
        assert loss in ("focal", "xent"), loss
        self.in_channels = in_channels
        self.classes = list(classes)
        self.loss_type = loss
        self.transform = BEVGridTransform(**grid_transform)
        self.classifier = nn.Sequential(
            *conv_bn_relu(in_channels, in_channels), *conv_bn_relu(in_channels, in_channels),
            nn.Conv2d(in_channels, len(self.classes), 1),
        )

    def forward(self, x: Any) -> torch.Tensor:
        """Decoder BEV map (or [map]) -> logits [B, classes, Hm, Wm]; apply sigmoid for probabilities."""
        x = x[0] if isinstance(x, (list, tuple)) else x
        return self.classifier(self.transform(x))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-class mean sigmoid focal (gamma 2, no alpha) or BCE against {0, 1} masks [B, classes, Hm, Wm]."""
        target = target.to(logits.dtype)
        losses = {}
        for index, name in enumerate(self.classes):
            if self.loss_type == "focal":
                loss = sigmoid_focal_loss(logits[:, index], target[:, index], alpha=-1) / target[:, index].numel()
            else:
                loss = F.binary_cross_entropy_with_logits(logits[:, index], target[:, index])
            losses[f"{name}/{self.loss_type}"] = loss
        return losses
