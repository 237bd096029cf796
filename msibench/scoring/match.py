"""Matching layout targets to detections: per category, Hungarian assignment on IoU; and finding each subject
wherever it was drawn, for the identity crop.

- :func:`match_targets` (YOLO-L, Z-Acc, the ``matched`` crop): for every COCO category of a task, the subjects'
  target boxes and the detections of that category form an IoU matrix; scipy's ``linear_sum_assignment`` picks
  the assignment with the largest total IoU among pairs with IoU >= :data:`MIN_MATCH_IOU` (0.1); a target
  without such a pair stays unmatched. Targets of different categories never compete.
- :func:`find_subjects` (the layout-free ``category`` crop of DINO-I / CLIP-I): the same IoU matching first, so
  a subject drawn where it was asked keeps the detection that overlaps its box; then, per category, the
  subjects still without a detection take the category's remaining detections: the r most confident ones (r =
  subjects left; equal confidences: the detector's order), assigned to those subjects by the Hungarian
  algorithm on the distance between box centres. Confidence picks *which* instances count because a method that
  takes no layout draws its subjects anywhere, so position says nothing about which detection is the subject;
  the centre distance only decides *which* subject of the category gets which of them (it matters only when a
  category has several subjects; by default the scorer then re-pairs them by appearance,
  ``scorer.pair_by_appearance``). A subject left without a detection (fewer instances of its category found than
  asked for) is "not found".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from msibench.scoring.detect import Detections

# Part of the scorer version. Below IoU 0.1 a detection is not a (badly placed) instance of the target but
# something else: the convention of detector error analysis (Hoiem et al., ECCV 2012, "Diagnosing Error in Object
# Detectors", and the COCO analyze tool: IoU in [0.1, 0.5) is a localization error, below 0.1 a background
# detection). Without it any overlap counted: a 0.26-confidence detection grazing the box at IoU 0.001 was taken
# over a 0.95-confidence detection of the same category elsewhere, which then never became the subject's crop.
MIN_MATCH_IOU = 0.1


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
        # pairs below the minimum cannot be matched, so they must not take part in the assignment either
        gain = np.where(iou >= MIN_MATCH_IOU, iou, 0.0)
        rows, cols = linear_sum_assignment(gain, maximize=True)
        for r, c in zip(rows, cols, strict=True):
            if gain[r, c] > 0.0:
                result[int(t_idx[r])] = Match(int(t_idx[r]), int(d_idx[c]), float(iou[r, c]))
    return [result[i] for i in range(len(targets))]


@dataclass(frozen=True)
class Found:
    """Where subject ``target`` was found for its identity crop: ``detection`` (None: not found) and by which rule
    (``"iou"``: the detection overlapping its box, as in :func:`match_targets`; ``"category"``: one of the most
    confident remaining detections of its category, nearest centre first)."""

    target: int
    detection: int | None
    rule: str | None
    iou: float

    @property
    def found(self) -> bool:
        return self.detection is not None


def find_subjects(
    target_boxes: Sequence[Sequence[float]],
    target_categories: Sequence[int],
    detections: Detections,
    matches: Sequence[Match] | None = None,
) -> list[Found]:
    """One :class:`Found` per target, in target order (see the module docstring for the rule). ``matches`` are
    this image's :func:`match_targets` result when already computed."""
    from scipy.optimize import linear_sum_assignment

    targets = np.asarray(target_boxes, dtype=np.float64).reshape(-1, 4)
    cats = np.asarray(target_categories, dtype=np.int64).reshape(-1)
    if matches is None:
        matches = match_targets(targets, cats, detections)
    out = {m.target: Found(m.target, m.detection, "iou", m.iou) for m in matches if m.matched}
    used = {m.detection for m in matches if m.matched}
    scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
    for category in np.unique(cats):
        left_targets = [int(t) for t in np.flatnonzero(cats == category) if int(t) not in out]
        if not left_targets:
            continue
        left_dets = [int(d) for d in np.flatnonzero(detections.category_ids == category) if int(d) not in used]
        # most confident first; a stable sort keeps the detector's order among equal confidences
        left_dets = sorted(left_dets, key=lambda d: -scores[d])[: len(left_targets)]
        if not left_dets:
            continue
        centre_t = (targets[left_targets, :2] + targets[left_targets, 2:]) / 2.0
        boxes_d = np.asarray(detections.boxes, dtype=np.float64)[left_dets]
        centre_d = (boxes_d[:, :2] + boxes_d[:, 2:]) / 2.0
        dist = np.linalg.norm(centre_t[:, None, :] - centre_d[None, :, :], axis=-1)
        rows, cols = linear_sum_assignment(dist)
        for r, c in zip(rows, cols, strict=True):
            t, d = left_targets[r], left_dets[c]
            iou = float(box_iou(targets[t], np.asarray(detections.boxes, dtype=np.float64)[d])[0, 0])
            out[t] = Found(t, d, "category", iou)
    return [out.get(i, Found(i, None, None, 0.0)) for i in range(len(targets))]
