"""Per-frame agreement of two predictions of the same frame (PyTorch vs deployed, or onnxruntime vs TensorRT): boxes
matched one to one, BEV mask IoU. Plain numpy on the result dicts (boxes_3d, scores_3d, labels_3d, masks_bev)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MATCH_DISTANCE_M = 0.5  # the strictest nuScenes matching distance: the "same" detection
CONFIDENT_SCORE = 0.3  # reference boxes scoring at least this are the ones a user acts on
MASK_THRESHOLD = 0.5


def _array(result: Mapping[str, Any], key: str) -> np.ndarray:
    value = result[key]
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)


def match_boxes(reference: Mapping[str, Any], other: Mapping[str, Any],
                distance: float = MATCH_DISTANCE_M) -> list[tuple[int, int]]:
    """Greedy one-to-one matches (reference index, other index): reference boxes best first, each to the nearest
    unmatched box of the same class whose BEV centre lies within `distance` metres."""
    ref_boxes, ref_labels = _array(reference, "boxes_3d"), _array(reference, "labels_3d")
    boxes, labels = _array(other, "boxes_3d"), _array(other, "labels_3d")
    taken = np.zeros(len(boxes), dtype=bool)
    pairs = []
    for i in np.argsort(-_array(reference, "scores_3d"), kind="stable"):
        if not len(boxes):
            break
        dist = np.linalg.norm(boxes[:, :2] - ref_boxes[i, :2], axis=1)
        dist[taken | (labels != ref_labels[i])] = np.inf
        j = int(np.argmin(dist))
        if dist[j] <= distance:
            taken[j] = True
            pairs.append((int(i), j))
    return pairs


def mask_iou(reference: np.ndarray, other: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """IoU per map class of the two masks binarised at `threshold` (1 where both are empty: they agree)."""
    a, b = reference >= threshold, other >= threshold
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def agreement(references: Sequence[Mapping[str, Any]], others: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Box match rates (all reference boxes; confident ones), score and centre differences of matched boxes, and
    mask IoU (mean over frames and classes, worst frame), over a list of frames."""
    matched = total = confident_matched = confident = 0
    score_diff, centre_diff, ious = [], [], []
    for ref, other in zip(references, others, strict=True):
        pairs = match_boxes(ref, other)
        scores = _array(ref, "scores_3d")
        is_confident = scores >= CONFIDENT_SCORE
        hit = np.zeros(len(scores), dtype=bool)
        hit[[i for i, _ in pairs]] = True
        matched, total = matched + int(hit.sum()), total + len(scores)
        confident_matched, confident = confident_matched + int((hit & is_confident).sum()), confident + int(
            is_confident.sum())
        other_scores, ref_boxes, boxes = _array(other, "scores_3d"), _array(ref, "boxes_3d"), _array(other, "boxes_3d")
        score_diff += [abs(scores[i] - other_scores[j]) for i, j in pairs]
        centre_diff += [float(np.linalg.norm(ref_boxes[i, :2] - boxes[j, :2])) for i, j in pairs]
        if "masks_bev" in ref and "masks_bev" in other:
            ious.append(mask_iou(_array(ref, "masks_bev"), _array(other, "masks_bev")))
    out: dict[str, Any] = {
        "frames": len(references),
        "boxes": total,
        "box_match_rate": matched / total if total else 1.0,
        "confident_boxes": confident,
        "confident_box_match_rate": confident_matched / confident if confident else 1.0,
        "matched_score_diff_max": float(max(score_diff, default=0.0)),
        "matched_centre_diff_mean_m": float(np.mean(centre_diff)) if centre_diff else 0.0,
        "match_distance_m": MATCH_DISTANCE_M,
        "confident_score": CONFIDENT_SCORE,
    }
    if ious:
        per_frame = np.stack(ious)
        out.update(mask_iou_mean=float(per_frame.mean()), mask_iou_worst_frame=float(per_frame.mean(1).min()),
                   mask_threshold=MASK_THRESHOLD)
    return out
