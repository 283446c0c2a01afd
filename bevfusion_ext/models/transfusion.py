"""TransFusion object head (BEVFusion's 3D detection head) in plain torch.

Dense class heatmap -> top-K local maxima as object queries (+ class embedding, learned positional encoding) ->
transformer decoder layer(s) with a hand-written multi-head attention over the flattened BEV map -> Conv1d
prediction FFNs per box parameter. The attention keeps BEVFusion's layout: a fused ``in_proj_weight`` Parameter
[3E, E] sliced with F.linear (not nn.Linear modules, not nn.MultiheadAttention) and q/k/v reshaped to heads.

Training targets: each layer's queries are matched one-to-one to the ground truth with a Hungarian assignment
(scipy) on BEV centre distance in grid cells plus a large penalty for a class different from the query's proposal
class; matched queries get L1 box targets and a one-hot class target, the rest are background.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..deploy.kernels import box_scores, decode_boxes, select_boxes
from .common import ConvModule
from .registry import MODELS, build_model

CLASS_MISMATCH_COST = 1e3  # in grid cells: a query is matched to another class only if none of its own is left
BOX_CODE = ("center", "height", "dim", "rot", "vel")  # regression branches, in target order
CODE_SIZE = 10  # 2 + 1 + 3 + 2 + 2 regression channels


@MODELS.register_module()
class TransFusionBBoxCoder:
    """Boxes <-> head outputs: centre in head-grid cells, z centre, log(l, w, h), (sin, cos) yaw, velocity."""

    def __init__(self, pc_range: Sequence[float], voxel_size: Sequence[float], out_size_factor: int,
                 score_threshold: float = 0.0) -> None:
        self.origin = torch.tensor(pc_range[:2], dtype=torch.float32)
        self.cell = torch.tensor(voxel_size[:2], dtype=torch.float32) * out_size_factor
        self.score_threshold = score_threshold

    def to_grid(self, xy: torch.Tensor) -> torch.Tensor:
        """Metric ego-frame (x, y) [..., 2] -> continuous head-grid (col, row) [..., 2]."""
        return (xy - self.origin.to(xy)) / self.cell.to(xy)

    def encode(self, boxes: torch.Tensor) -> torch.Tensor:
        """(x, y, z, l, w, h, yaw) [M, 7] -> regression targets [M, 10] in BOX_CODE order (zero velocity)."""
        yaw = boxes[:, 6:7]
        return torch.cat([self.to_grid(boxes[:, :2]), boxes[:, 2:3], boxes[:, 3:6].clamp(min=1e-3).log(),
                          yaw.sin(), yaw.cos(), boxes.new_zeros(len(boxes), 2)], dim=1)

    def decode(self, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-query predictions ([B, c, P] each) -> boxes [B, P, 7] in the ego frame."""
        return decode_boxes(preds["center"], preds["height"], preds["dim"], preds["rot"], self.origin, self.cell)


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with BEVFusion's parameter layout (fused in_proj_weight + out_proj Linear)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [B, Lq, E], key/value [B, Lk, E] -> [B, Lq, E]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))
        k = self._split_heads(F.linear(key, w_k, b_k))
        v = self._split_heads(F.linear(value, w_v, b_v))
        attn = self.dropout(((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim)
        return self.out_proj(out)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, E] -> [B, heads, L, E // heads]."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute position embedding of BEV grid coordinates: Conv1d -> BN1d -> ReLU -> Conv1d."""

    def __init__(self, input_channel: int, num_pos_feats: int) -> None:
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Conv1d(input_channel, num_pos_feats, 1), nn.BatchNorm1d(num_pos_feats), nn.ReLU(inplace=True),
            nn.Conv1d(num_pos_feats, num_pos_feats, 1),
        )

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        """[B, P, 2] grid coordinates -> [B, P, C] embeddings."""
        return self.position_embedding_head(xyz.transpose(1, 2)).transpose(1, 2)


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the BEV map, FFN; post-norm residuals as in BEVFusion."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(4))
        self.activation = getattr(F, activation)
        self.self_posembed = PositionEmbeddingLearned(2, d_model)
        self.cross_posembed = PositionEmbeddingLearned(2, d_model)

    def forward(self, query: torch.Tensor, key: torch.Tensor, query_pos: torch.Tensor,
                key_pos: torch.Tensor) -> torch.Tensor:
        """query [B, C, Pq], key [B, C, Pk], positions [B, P, 2] -> updated query [B, C, Pq]."""
        q_pos = self.self_posembed(query_pos)
        k = key.transpose(1, 2) + self.cross_posembed(key_pos)
        x = query.transpose(1, 2)
        q = x + q_pos
        x = self.norm1(x + self.dropout1(self.self_attn(q, q, q)))
        x = self.norm2(x + self.dropout2(self.multihead_attn(x + q_pos, k, k)))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x))))))
        return x.transpose(1, 2)


class PredictionFFN(nn.Module):
    """One Conv1d branch per predicted quantity: (num_conv - 1) x [Conv1d-BN1d-ReLU] + Conv1d(out)."""

    def __init__(self, in_channels: int, heads: Mapping[str, Sequence[int]], head_conv: int = 64,
                 heatmap_bias: float = -2.19) -> None:
        super().__init__()
        self.heads = list(heads)
        for name, (classes, num_conv) in heads.items():
            layers: list[nn.Module] = []
            channels = in_channels
            for _ in range(num_conv - 1):
                layers += [nn.Conv1d(channels, head_conv, 1, bias=False), nn.BatchNorm1d(head_conv),
                           nn.ReLU(inplace=True)]
                channels = head_conv
            layers.append(nn.Conv1d(channels, classes, 1))
            self.add_module(name, nn.Sequential(*layers))
        nn.init.constant_(self.heatmap[-1].bias, heatmap_bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query features [B, C, P] -> {name: [B, c, P]}."""
        return {name: getattr(self, name)(x) for name in self.heads}


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float) -> torch.Tensor:
    """CenterNet's radius (in cells) within which a shifted box keeps IoU >= min_overlap with the true one."""
    def root(a: float, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (b + (b * b - 4 * a * c).clamp(min=0).sqrt()) / 2

    area, span = height * width, height + width
    r1 = root(1.0, span, area * (1 - min_overlap) / (1 + min_overlap))
    r2 = root(4.0, 2 * span, (1 - min_overlap) * area)
    r3 = root(4.0 * min_overlap, -2 * min_overlap * span, (min_overlap - 1) * area)
    return torch.minimum(torch.minimum(r1, r2), r3)


def clip_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Sigmoid kept away from 0 and 1 so the focal log terms stay finite."""
    return x.sigmoid().clamp(min=eps, max=1 - eps)


def gaussian_focal_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet focal loss on probabilities vs a Gaussian heatmap, summed (peaks, target == 1, are positives)."""
    pos = target.eq(1).float()
    pos_loss = -pred.log() * (1 - pred).pow(2) * pos
    neg_loss = -(1 - pred).log() * pred.pow(2) * (1 - target).pow(4) * (1 - pos)
    return (pos_loss + neg_loss).sum()


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                       alpha: float = 0.25) -> torch.Tensor:
    """RetinaNet sigmoid focal loss, summed; alpha < 0 disables the class balance."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.sum()


@MODELS.register_module()
class TransFusionHead(nn.Module):
    """TransFusion head: heatmap proposals -> transformer decoder -> per-query boxes (see the module docstring).

    ``train_cfg`` keys read: gaussian_overlap, min_radius, code_weights; ``test_cfg``: max_num; ``bbox_coder``:
    a TransFusionBBoxCoder config (pc_range, voxel_size, out_size_factor, score_threshold). Other keys are ignored,
    so BEVFusion's richer train/test configs load.
    """

    def __init__(self, in_channels: int, num_classes: int, num_proposals: int = 128, hidden_channel: int = 128,
                 num_decoder_layers: int = 1, num_heads: int = 8, nms_kernel_size: int = 3, ffn_channel: int = 256,
                 dropout: float = 0.1, bn_momentum: float = 0.1, activation: str = "relu",
                 common_heads: Mapping[str, Sequence[int]] | None = None, num_heatmap_convs: int = 2,
                 head_conv: int = 64, train_cfg: Mapping[str, Any] | None = None,
                 test_cfg: Mapping[str, Any] | None = None, bbox_coder: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_proposals = num_proposals
        self.nms_kernel_size = nms_kernel_size
        self.train_cfg = dict(train_cfg or {})
        self.test_cfg = dict(test_cfg or {})
        self.bbox_coder = build_model({"type": "TransFusionBBoxCoder", **(bbox_coder or {})})
        common_heads = dict(common_heads or {"center": (2, 2), "height": (1, 2), "dim": (3, 2), "rot": (2, 2),
                                             "vel": (2, 2)})
        assert tuple(common_heads) == BOX_CODE, f"common_heads must be {BOX_CODE} in this order"
        self.shared_conv = nn.Conv2d(in_channels, hidden_channel, 3, padding=1)
        self.heatmap_head = nn.Sequential(
            ConvModule(hidden_channel, hidden_channel, 3), nn.Conv2d(hidden_channel, num_classes, 3, padding=1)
        )
        nn.init.constant_(self.heatmap_head[-1].bias, -2.19)
        self.class_encoding = nn.Conv1d(num_classes, hidden_channel, 1)
        self.decoder = nn.ModuleList(
            TransformerDecoderLayer(hidden_channel, num_heads, ffn_channel, dropout, activation)
            for _ in range(num_decoder_layers)
        )
        heads = {**common_heads, "heatmap": (num_classes, num_heatmap_convs)}
        self.prediction_heads = nn.ModuleList(
            PredictionFFN(hidden_channel, heads, head_conv) for _ in range(num_decoder_layers)
        )
        for module in self.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.momentum = bn_momentum

    def forward(self, feats: Any) -> dict[str, torch.Tensor]:
        """BEV map [B, C, H, W] (or [map]) -> per-query predictions, every layer concatenated along the query dim.

        Returns center/height/dim/rot/vel/heatmap [B, c, layers * P], dense_heatmap [B, classes, H, W] (logits),
        query_labels [B, P] (proposal classes) and query_scores [B, P] (heatmap probability at the proposal).
        """
        x = feats[0] if isinstance(feats, (list, tuple)) else feats
        B, _, H, W = x.shape
        feat = self.shared_conv(x)
        feat_flat = feat.flatten(2)
        bev_pos = self.bev_pos(H, W, x).expand(B, -1, -1)
        dense_heatmap = self.heatmap_head(feat)
        scores, labels, index = self.proposals(dense_heatmap.detach().sigmoid())
        query = feat_flat.gather(2, index.unsqueeze(1).expand(-1, feat_flat.shape[1], -1))
        query = query + self.class_encoding(F.one_hot(labels, self.num_classes).transpose(1, 2).float())
        query_pos = bev_pos.gather(1, index.unsqueeze(-1).expand(-1, -1, 2))
        layers = []
        for decoder, predict in zip(self.decoder, self.prediction_heads, strict=True):
            query = decoder(query, feat_flat, query_pos, bev_pos)
            res = predict(query)
            res["center"] = res["center"] + query_pos.transpose(1, 2)
            layers.append(res)
            query_pos = res["center"].detach().transpose(1, 2)
        preds = {key: torch.cat([res[key] for res in layers], dim=-1) for key in layers[0]}
        preds.update(dense_heatmap=dense_heatmap, query_labels=labels, query_scores=scores)
        return preds

    @staticmethod
    def bev_pos(H: int, W: int, like: torch.Tensor) -> torch.Tensor:
        """Cell-centre (col + 0.5, row + 0.5) of every flattened BEV cell, [1, H*W, 2], row-major like flatten(2)."""
        rows, cols = torch.meshgrid(torch.arange(H, dtype=like.dtype, device=like.device),
                                    torch.arange(W, dtype=like.dtype, device=like.device), indexing="ij")
        return torch.stack([cols, rows], dim=-1).view(1, H * W, 2) + 0.5

    def proposals(self, heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top num_proposals local maxima (max-pool NMS) over classes x cells -> scores, classes, flat cell index."""
        local_max = F.max_pool2d(heatmap, self.nms_kernel_size, stride=1, padding=self.nms_kernel_size // 2)
        heatmap = heatmap * (heatmap == local_max)
        scores, flat = heatmap.flatten(1).topk(self.num_proposals, dim=1)
        cells = heatmap.shape[2] * heatmap.shape[3]
        return scores, torch.div(flat, cells, rounding_mode="floor"), flat % cells

    def loss(self, gt_bboxes_3d: Sequence[torch.Tensor], gt_labels_3d: Sequence[torch.Tensor],
             preds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Heatmap focal loss + per decoder layer query focal (classes) and L1 (boxes) losses."""
        dense = preds["dense_heatmap"]
        target = torch.stack([self.heatmap_target(boxes, labels, dense.shape[2:])
                              for boxes, labels in zip(gt_bboxes_3d, gt_labels_3d, strict=True)])
        num_peaks = max(float(target.eq(1).sum()), 1.0)
        losses = {"loss_heatmap": gaussian_focal_loss(clip_sigmoid(dense), target) / num_peaks}
        P, num_layers = self.num_proposals, len(self.decoder)
        code_weights = dense.new_tensor(self.train_cfg.get("code_weights", [1.0] * 8 + [0.2] * 2))
        for i in range(num_layers):
            layer = {key: preds[key][..., i * P:(i + 1) * P] for key in (*BOX_CODE, "heatmap")}
            cls_target, box_target, box_mask = self.query_targets(gt_bboxes_3d, gt_labels_3d, layer,
                                                                  preds["query_labels"])
            num_pos = max(float(box_mask.sum()), 1.0)
            box_pred = torch.cat([layer[key] for key in BOX_CODE], dim=1)
            l1 = ((box_pred - box_target).abs() * code_weights.view(1, -1, 1) * box_mask.unsqueeze(1)).sum()
            prefix = "layer_-1" if i == num_layers - 1 else f"layer_{i}"
            losses[f"{prefix}_loss_cls"] = sigmoid_focal_loss(layer["heatmap"], cls_target) / num_pos
            losses[f"{prefix}_loss_bbox"] = 0.25 * l1 / num_pos
        return losses

    def heatmap_target(self, boxes: torch.Tensor, labels: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Gaussian peaks [classes, H, W] at the integer grid cell of every box centre inside the grid."""
        H, W = shape
        target = boxes.new_zeros(self.num_classes, H, W)
        center = self.bbox_coder.to_grid(boxes[:, :2])
        cell = center.floor().long()
        inside = (cell[:, 0] >= 0) & (cell[:, 0] < W) & (cell[:, 1] >= 0) & (cell[:, 1] < H)
        if not inside.any():
            return target
        boxes, labels, cell = boxes[inside], labels[inside], cell[inside]
        size = boxes[:, 3:5] / self.bbox_coder.cell.to(boxes)
        radius = gaussian_radius(size[:, 0], size[:, 1], self.train_cfg.get("gaussian_overlap", 0.1))
        radius = radius.floor().clamp(min=self.train_cfg.get("min_radius", 2)).view(-1, 1, 1)
        dx = torch.arange(W, device=boxes.device).view(1, 1, W) - cell[:, 0].view(-1, 1, 1)
        dy = torch.arange(H, device=boxes.device).view(1, H, 1) - cell[:, 1].view(-1, 1, 1)
        sigma = (2 * radius + 1) / 6
        peaks = torch.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)) * ((dx.abs() <= radius) & (dy.abs() <= radius))
        for c in labels.unique().tolist():
            target[c] = peaks[labels == c].amax(dim=0)
        return target

    def query_targets(self, gt_bboxes_3d: Sequence[torch.Tensor], gt_labels_3d: Sequence[torch.Tensor],
                      layer: Mapping[str, torch.Tensor],
                      query_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hungarian match per sample -> class targets [B, classes, P], box targets [B, 10, P], positive mask [B, P]."""
        B, P = query_labels.shape
        cls_target = layer["heatmap"].new_zeros(B, self.num_classes, P)
        box_target = layer["center"].new_zeros(B, CODE_SIZE, P)
        box_mask = layer["center"].new_zeros(B, P)
        for b, (boxes, labels) in enumerate(zip(gt_bboxes_3d, gt_labels_3d, strict=True)):
            if len(boxes) == 0:
                continue
            gt_center = self.bbox_coder.to_grid(boxes[:, :2])
            cost = torch.cdist(layer["center"][b].detach().T, gt_center)
            cost = cost + CLASS_MISMATCH_COST * (query_labels[b].unsqueeze(1) != labels.unsqueeze(0))
            q, g = (torch.as_tensor(idx, device=labels.device) for idx in linear_sum_assignment(cost.cpu().numpy()))
            cls_target[b, labels[g], q] = 1.0
            box_target[b][:, q] = self.bbox_coder.encode(boxes[g]).T
            box_mask[b, q] = 1.0
        return cls_target, box_target, box_mask

    @torch.no_grad()
    def get_bboxes(self, preds: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Last layer's queries -> per sample (boxes [K, 7], scores [K], labels [K]), best first, K <= max_num.

        score = sigmoid(query class logit of the proposal class) * heatmap probability at the proposal.
        """
        P = self.num_proposals
        last = {key: preds[key][..., -P:] for key in (*BOX_CODE, "heatmap")}
        labels = preds["query_labels"]
        scores = box_scores(last["heatmap"], labels, preds["query_scores"])
        boxes = self.bbox_coder.decode(last)
        max_num = self.test_cfg.get("max_num", P)
        return [select_boxes(boxes[b], scores[b], labels[b], self.bbox_coder.score_threshold, max_num)
                for b in range(len(boxes))]
