"""Matching layout targets to detections: per category, Hungarian assignment on IoU.

For every COCO category of a task, the subjects' target boxes and the detections of that category form an IoU
matrix; scipy's ``linear_sum_assignment`` picks the assignment with the largest total IoU, and assigned pairs
with IoU 0 are dropped (the target stays unmatched). Targets of different categories never compete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from msibench.scoring.detect import Detections


@dataclass(frozen=True)
class Match:
    """The detection matched to target ``target`` (None when unmatched) and their IoU (0 when unmatched)."""

    target: int
    detection: int | None
    iou: float

    @property
    def matched(self) -> bool:
        return self.detection is not None


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4); degenerate boxes have IoU 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def match_targets(
    target_boxes: Sequence[Sequence[float]], target_categories: Sequence[int], detections: Detections
) -> list[Match]:
    """One :class:`Match` per target, in target order (boxes normalized xyxy, categories COCO ids)."""
    from scipy.optimize import linear_sum_assignment

    targets = np.asarray(target_boxes, dtype=np.float64).reshape(-1, 4)
    cats = np.asarray(target_categories, dtype=np.int64).reshape(-1)
    if len(cats) != len(targets):
        raise ValueError(f"{len(targets)} target boxes but {len(cats)} categories")
    result: dict[int, Match] = {i: Match(i, None, 0.0) for i in range(len(targets))}
    for category in np.unique(cats):
        t_idx = np.flatnonzero(cats == category)
        d_idx = np.flatnonzero(detections.category_ids == category)
        if len(d_idx) == 0:
            continue
        iou = box_iou(targets[t_idx], detections.boxes[d_idx])
        rows, cols = linear_sum_assignment(iou, maximize=True)
        for r, c in zip(rows, cols, strict=True):
            if iou[r, c] > 0.0:
                result[int(t_idx[r])] = Match(int(t_idx[r]), int(d_idx[c]), float(iou[r, c]))
    return [result[i] for i in range(len(targets))]
