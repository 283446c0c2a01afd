"""Top-level BEVFusion model: camera + lidar encoders -> fuser -> decoder -> object / map heads.

Module tree as in mit-han-lab/bevfusion: ``encoders.camera.{backbone,neck,vtransform}``,
``encoders.lidar.{voxelize,backbone}``, ``fuser``, ``decoder.{backbone,neck}``, ``heads.{object,map}``.
Inputs and outputs follow docs/contract.md.
"""
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from mmcv.runner import BaseModule, auto_fp16
from torch import nn

from .registry import MODELS, build_model

HEAD_NAMES = ("object", "map")


@MODELS.register_module(name="ReferenceBEVFusion")
class BEVFusion(BaseModule):
    """Multi-sensor multi-task BEV model with mmdet's train_step / val_step contract.

    Registered as `ReferenceBEVFusion` so a config names either this stand-in or BEVFusion's own `BEVFusion`.
    """

    def __init__(self, encoders: Mapping[str, Any], fuser: Mapping[str, Any] | None, decoder: Mapping[str, Any],
                 heads: Mapping[str, Any], loss_scale: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.fp16_enabled = False
        self.encoders = nn.ModuleDict()
        if encoders.get("camera") is not None:
            self.encoders["camera"] = nn.ModuleDict(
                {part: build_model(encoders["camera"][part]) for part in ("backbone", "neck", "vtransform")}
            )
        if encoders.get("lidar") is not None:
            self.encoders["lidar"] = nn.ModuleDict({
                "voxelize": build_model({"type": "DenseVoxelization", **encoders["lidar"]["voxelize"]}),
                "backbone": build_model(encoders["lidar"]["backbone"]),
            })
        assert len(self.encoders) > 0, "at least one of encoders.camera / encoders.lidar is required"
        self.fuser = build_model(fuser) if fuser is not None else None
        assert self.fuser is not None or len(self.encoders) == 1, "several encoders need a fuser"
        self.decoder = nn.ModuleDict({part: build_model(decoder[part]) for part in ("backbone", "neck")})
        unknown = set(heads) - set(HEAD_NAMES)
        assert not unknown, f"unsupported heads {sorted(unknown)}; expected {HEAD_NAMES}"
        self.heads = nn.ModuleDict({name: build_model(cfg) for name, cfg in heads.items() if cfg is not None})
        self.loss_scale = {name: float((loss_scale or {}).get(name, 1.0)) for name in self.heads}

    def init_weights(self) -> None:
        """Only the camera backbone has an init_cfg (pretrained Swin), as in BEVFusion.

        mmcv's generic BaseModule.init_weights would also choke on the int64 ``vtransform.nx`` parameter.
        """
        if "camera" in self.encoders:
            self.encoders["camera"]["backbone"].init_weights()

    def extract_camera_features(self, img: torch.Tensor, points: Sequence[torch.Tensor],
                                camera_intrinsics: torch.Tensor, camera2lidar: torch.Tensor) -> torch.Tensor:
        """Images [B, N, 3, H, W] -> camera BEV features [B, C_cam, H_bev, W_bev]."""
        B, N = img.shape[:2]
        camera = self.encoders["camera"]
        x = camera["neck"](camera["backbone"](img.flatten(0, 1)))
        x = x[0] if not isinstance(x, torch.Tensor) else x
        return camera["vtransform"](x.view(B, N, *x.shape[1:]), points, camera_intrinsics, camera2lidar)

    def extract_lidar_features(self, points: Sequence[torch.Tensor]) -> torch.Tensor:
        """Point clouds -> lidar BEV features [B, C_lidar, H_bev, W_bev]."""
        lidar = self.encoders["lidar"]
        return lidar["backbone"](lidar["voxelize"](points))

    def extract_features(self, img: torch.Tensor, points: Sequence[torch.Tensor], camera_intrinsics: torch.Tensor,
                         camera2lidar: torch.Tensor) -> list[torch.Tensor]:
        """Encode each sensor (camera first, as the fuser's in_channels expect), fuse, decode -> [BEV map]."""
        features = [
            self.extract_camera_features(img, points, camera_intrinsics, camera2lidar) if sensor == "camera"
            else self.extract_lidar_features(points)
            for sensor in self.encoders
        ]
        x = self.fuser(features) if self.fuser is not None else features[0]
        return self.decoder["neck"](self.decoder["backbone"](x))

    @auto_fp16(apply_to=("img", "points"))
    def forward(self, img: torch.Tensor, points: Sequence[torch.Tensor], camera_intrinsics: torch.Tensor,
                camera2lidar: torch.Tensor, gt_bboxes_3d: Sequence[torch.Tensor] | None = None,
                gt_labels_3d: Sequence[torch.Tensor] | None = None, gt_masks_bev: torch.Tensor | None = None,
                metas: Sequence[dict] | None = None, return_loss: bool = True,
                **kwargs: Any) -> Any:
        """return_loss: {"loss/<head>/<name>": scalar}; else one dict per sample (boxes_3d, scores_3d, labels_3d,
        masks_bev). Extra batch keys (metas, ...) are accepted and unused."""
        x = self.extract_features(img, points, camera_intrinsics, camera2lidar)
        if return_loss:
            return self.losses(x, gt_bboxes_3d, gt_labels_3d, gt_masks_bev)
        return self.predict(x, batch_size=img.shape[0])

    def losses(self, x: list[torch.Tensor], gt_bboxes_3d: Sequence[torch.Tensor] | None,
               gt_labels_3d: Sequence[torch.Tensor] | None,
               gt_masks_bev: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every head's losses, scaled by loss_scale[head] and named loss/<head>/<loss>."""
        outputs = {}
        for name, head in self.heads.items():
            if name == "object":
                losses = head.loss(gt_bboxes_3d, gt_labels_3d, head(x))
            else:
                losses = head.loss(head(x), gt_masks_bev)
            outputs.update({f"loss/{name}/{key}": value * self.loss_scale[name] for key, value in losses.items()})
        return outputs

    @torch.no_grad()
    def predict(self, x: list[torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Decoded boxes (ego frame, best first) and map probabilities per sample, on the CPU."""
        outputs: list[dict[str, torch.Tensor]] = [{} for _ in range(batch_size)]
        for name, head in self.heads.items():
            if name == "object":
                for out, (boxes, scores, labels) in zip(outputs, head.get_bboxes(head(x)), strict=True):
                    out.update(boxes_3d=boxes.cpu(), scores_3d=scores.cpu(), labels_3d=labels.cpu())
            else:
                for out, masks in zip(outputs, head(x).sigmoid(), strict=True):
                    out["masks_bev"] = masks.cpu()
        return outputs

    @staticmethod
    def _parse_losses(losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, OrderedDict]:
        """Sum entries named *loss*; log every entry as a float, averaged over ranks when distributed."""
        log_vars = OrderedDict((name, value.mean()) for name, value in losses.items())
        loss = sum(value for name, value in log_vars.items() if "loss" in name)
        log_vars["loss"] = loss
        distributed = dist.is_available() and dist.is_initialized()
        for name, value in log_vars.items():
            value = value.detach().clone()
            if distributed:
                dist.all_reduce(value.div_(dist.get_world_size()))
            log_vars[name] = value.item()
        return loss, log_vars

    def train_step(self, data: Mapping[str, Any], optimizer: Any = None) -> dict[str, Any]:
        """One forward with losses; backward and the optimizer step are left to mmcv's OptimizerHook."""
        loss, log_vars = self._parse_losses(self(**data))
        return dict(loss=loss, log_vars=log_vars, num_samples=len(data["img"]))

    def val_step(self, data: Mapping[str, Any], optimizer: Any = None) -> dict[str, Any]:
        """Same as train_step (mmdet's BaseDetector contract): losses on validation data, no update."""
        return self.train_step(data, optimizer)
