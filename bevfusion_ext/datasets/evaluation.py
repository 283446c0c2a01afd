"""nuScenes-style 3D detection metrics and BEVFusion-style BEV map IoU, numpy only.

Detection follows nuscenes-devkit (`accumulate`, `calc_ap`, `calc_tp`): greedy matching by BEV centre distance, AP on
101 recall points ignoring recall <= 0.1 and precision < 0.1, TP errors at the 2 m threshold. Our NDS keeps only
the TP metrics the synthetic data has (ATE, ASE, AOE; no velocity or attributes):
NDS = (5 * mAP + sum(1 - min(1, err))) / 8. Classes without any ground truth in the evaluated set are reported as NaN
and left out of the means (nuScenes would count them as AP 0); the same holds for map classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIST_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
TP_THRESHOLD = 2.0
MIN_RECALL = 0.1
MIN_PRECISION = 0.1
NUM_RECALL_POINTS = 101
TP_METRICS = ("ATE", "ASE", "AOE")
SEG_THRESHOLDS = (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65)
PI_PERIODIC_CLASSES = ("barrier",)


def yaw_difference(yaw_a: np.ndarray, yaw_b: np.ndarray, period: float = 2 * np.pi) -> np.ndarray:
    """Smallest absolute yaw difference in [0, pi] given the class' orientation period (nuScenes `yaw_diff`)."""
    diff = (yaw_a - yaw_b + period / 2) % period - period / 2
    return np.abs(np.where(diff > np.pi, diff - 2 * np.pi, diff))


def scale_iou(size_a: np.ndarray, size_b: np.ndarray) -> np.ndarray:
    """3D IoU of boxes [..., 3] (l, w, h) after aligning centres and yaw."""
    inter = np.prod(np.minimum(size_a, size_b), axis=-1)
    return inter / (np.prod(size_a, axis=-1) + np.prod(size_b, axis=-1) - inter)


def match_class(pred_boxes: Sequence[np.ndarray], pred_scores: Sequence[np.ndarray],
                gt_boxes: Sequence[np.ndarray], threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy nuScenes matching of one class over the eval set.

    Returns per-prediction (sorted by descending score) TP flags and scores, and the matched (pred, gt) box pairs
    [T, 2, 7] in match order.
    """
    sample = np.concatenate([np.full(len(s), i) for i, s in enumerate(pred_scores)] + [np.zeros(0, int)])
    row = np.concatenate([np.arange(len(s)) for s in pred_scores] + [np.zeros(0, int)])
    scores = np.concatenate([np.asarray(s, dtype=np.float64) for s in pred_scores] + [np.zeros(0)])
    order = np.argsort(-scores, kind="stable")
    taken = [np.zeros(len(g), dtype=bool) for g in gt_boxes]
    is_tp = np.zeros(len(order), dtype=bool)
    pairs = []
    for k, idx in enumerate(order):
        s, pred = sample[idx], pred_boxes[sample[idx]][row[idx]]
        if not len(gt_boxes[s]):
            continue
        dist = np.where(taken[s], np.inf, np.linalg.norm(gt_boxes[s][:, :2] - pred[:2], axis=1))
        j = int(np.argmin(dist))
        if dist[j] < threshold:
            taken[s][j] = is_tp[k] = True
            pairs.append((pred, gt_boxes[s][j]))
    return is_tp, scores[order], np.array(pairs, dtype=np.float64).reshape(-1, 2, 7)


def precision_recall_curve(is_tp: np.ndarray, scores: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and confidence on 101 evenly spaced recall points (nuScenes `accumulate`)."""
    tp = np.cumsum(is_tp).astype(float)
    fp = np.cumsum(~is_tp).astype(float)
    recall = tp / num_gt
    grid = np.linspace(0.0, 1.0, NUM_RECALL_POINTS)
    return np.interp(grid, recall, tp / (tp + fp), right=0), np.interp(grid, recall, scores, right=0)


def average_precision(precision: np.ndarray) -> float:
    """nuScenes `calc_ap`: mean of max(0, p - 0.1) over recall > 0.1, rescaled by 1 / 0.9."""
    p = np.clip(precision[round(100 * MIN_RECALL) + 1:] - MIN_PRECISION, 0.0, None)
    return float(np.mean(p / (1.0 - MIN_PRECISION)))  # rescale before averaging: perfect curves give exactly 1


def tp_error(errors: np.ndarray, match_scores: np.ndarray, confidence: np.ndarray) -> float:
    """nuScenes `calc_tp`: running-mean error resampled on the recall grid, averaged over recall in (0.1, max]."""
    nonzero = np.nonzero(confidence)[0]
    last = nonzero[-1] if len(nonzero) else 0
    first = round(100 * MIN_RECALL) + 1
    if last < first:
        return 1.0
    running = np.cumsum(errors) / np.arange(1, len(errors) + 1)
    curve = np.interp(confidence[::-1], match_scores[::-1], running[::-1])[::-1]
    return float(curve[first:last + 1].mean())


def _class_metrics(name: str, preds: Sequence[np.ndarray], scores: Sequence[np.ndarray],
                   gts: Sequence[np.ndarray]) -> dict[str, float]:
    """AP per distance threshold and TP errors at TP_THRESHOLD for one class."""
    num_gt = sum(len(g) for g in gts)
    out: dict[str, float] = {}
    for th in DIST_THRESHOLDS:
        is_tp, sorted_scores, pairs = match_class(preds, scores, gts, th)
        if not is_tp.any():
            out[f"AP@{th}"] = 0.0
            if th == TP_THRESHOLD:
                out.update({m: 1.0 for m in TP_METRICS})
            continue
        precision, confidence = precision_recall_curve(is_tp, sorted_scores, num_gt)
        out[f"AP@{th}"] = average_precision(precision)
        if th == TP_THRESHOLD:
            pred, gt = pairs[:, 0], pairs[:, 1]
            period = np.pi if name in PI_PERIODIC_CLASSES else 2 * np.pi
            errors = {"ATE": np.linalg.norm(pred[:, :2] - gt[:, :2], axis=1),
                      "ASE": 1.0 - scale_iou(pred[:, 3:6], gt[:, 3:6]),
                      "AOE": yaw_difference(gt[:, 6], pred[:, 6], period)}
            match_scores = sorted_scores[is_tp]
            out.update({m: tp_error(e, match_scores, confidence) for m, e in errors.items()})
    return out


def evaluate_detection(pred_boxes: Sequence[np.ndarray], pred_scores: Sequence[np.ndarray],
                       pred_labels: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
                       gt_labels: Sequence[np.ndarray], class_names: Sequence[str]) -> dict[str, float]:
    """det/mAP, det/NDS, det/mATE|mASE|mAOE plus per-class det/AP_<c>, det/AP_<c>@<th>, det/<ERR>_<c>."""
    metrics: dict[str, float] = {}
    valid = []
    for c, name in enumerate(class_names):
        gts = [np.asarray(g)[np.asarray(lab) == c] for g, lab in zip(gt_boxes, gt_labels, strict=True)]
        keep = [np.asarray(lab) == c for lab in pred_labels]
        if sum(len(g) for g in gts):
            per = _class_metrics(name, [b[k] for b, k in zip(pred_boxes, keep, strict=True)],
                                 [s[k] for s, k in zip(pred_scores, keep, strict=True)], gts)
            per["AP"] = float(np.mean([per[f"AP@{th}"] for th in DIST_THRESHOLDS]))
            valid.append(per)
        else:
            per = dict.fromkeys([f"AP@{th}" for th in DIST_THRESHOLDS] + list(TP_METRICS) + ["AP"], float("nan"))
        metrics.update({f"det/AP_{name}@{th}": per[f"AP@{th}"] for th in DIST_THRESHOLDS})
        metrics.update({f"det/{m}_{name}": per[m] for m in TP_METRICS})
        metrics[f"det/AP_{name}"] = per["AP"]
    mean_ap = float(np.mean([p["AP"] for p in valid])) if valid else 0.0
    errors = {m: float(np.mean([p[m] for p in valid])) if valid else 1.0 for m in TP_METRICS}
    metrics["det/mAP"] = mean_ap
    metrics.update({f"det/m{m}": e for m, e in errors.items()})
    metrics["det/NDS"] = (5 * mean_ap + sum(1 - min(1.0, e) for e in errors.values())) / (5 + len(TP_METRICS))
    return metrics


def evaluate_segmentation(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray],
                          class_names: Sequence[str]) -> dict[str, float]:
    """seg/mIoU and seg/IoU_<c>: per class the best IoU over SEG_THRESHOLDS, counts pooled over the eval set."""
    thresholds = np.asarray(SEG_THRESHOLDS)
    tp = np.zeros((len(class_names), len(thresholds)))
    fp, fn = np.zeros_like(tp), np.zeros_like(tp)
    for pred, gt in zip(pred_masks, gt_masks, strict=True):
        if np.shape(pred) != np.shape(gt):
            raise ValueError(f"masks_bev shape {np.shape(pred)} != gt_masks_bev shape {np.shape(gt)}")
        p = np.asarray(pred).reshape(len(class_names), -1, 1) >= thresholds
        g = np.asarray(gt).reshape(len(class_names), -1, 1) > 0.5
        tp += (p & g).sum(axis=1)
        fp += (p & ~g).sum(axis=1)
        fn += (~p & g).sum(axis=1)
    has_gt = (tp + fn)[:, 0] > 0
    iou = np.where(has_gt[:, None], tp / np.maximum(tp + fp + fn, 1), np.nan).max(axis=1)
    metrics = {f"seg/IoU_{name}": float(v) for name, v in zip(class_names, iou, strict=True)}
    metrics["seg/mIoU"] = float(iou[has_gt].mean()) if has_gt.any() else 0.0
    return metrics
