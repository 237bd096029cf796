"""Per-image detector metrics, as pure functions: YOLO-Subj, YOLO-L and Z-Acc.

Definitions (also in the README):

- YOLO-Subj: for a task with e_c expected and d_c detected instances of each of its categories c,
  sum_c min(e_c, d_c) / sum_c max(e_c, d_c); ``exact`` is 1 when d_c == e_c for every c of the task.
- YOLO-L: mean over target boxes of the IoU with the matched detection (0 when unmatched); YOLO-L@0.5 is the
  fraction of targets matched with IoU >= 0.5.
- Z-Acc: for each pair of subjects whose target boxes share at least one pixel, the subject with the higher z
  is correct when, inside that shared rectangle, its instance mask covers strictly more pixels than the other
  subject's. A pair with a subject that was not found (no matched detection, or no mask) is wrong.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from msibench.coco import CATEGORY_NAME
from msibench.scoring.match import Match


def _name(category_id: int) -> str:
    return CATEGORY_NAME.get(int(category_id), f"category {category_id}")


@dataclass(frozen=True)
class CountResult:
    value: float
    exact: bool
    expected: dict[str, int]
    detected: dict[str, int]
    reason: str


def yolo_subj(expected: Counter[int] | dict[int, int], detected: Counter[int] | dict[int, int]) -> CountResult:
    """YOLO-Subj of one image from expected and detected counts per COCO id (only expected categories count)."""
    cats = [c for c, n in expected.items() if n > 0]
    if not cats:
        raise ValueError("a task needs at least one expected subject")
    mins = sum(min(expected[c], detected.get(c, 0)) for c in cats)
    maxs = sum(max(expected[c], detected.get(c, 0)) for c in cats)
    exact = all(detected.get(c, 0) == expected[c] for c in cats)
    reason = "; ".join(f"expected {expected[c]} {_name(c)}, found {detected.get(c, 0)}" for c in cats)
    return CountResult(
        value=mins / maxs,
        exact=exact,
        expected={_name(c): int(expected[c]) for c in cats},
        detected={_name(c): int(detected.get(c, 0)) for c in cats},
        reason=reason,
    )


@dataclass(frozen=True)
class LayoutResult:
    value: float  # YOLO-L: mean IoU, unmatched targets count 0
    at50: float  # YOLO-L@0.5: fraction of targets matched with IoU >= 0.5
    reason: str


def yolo_l(matches: Sequence[Match], categories: Sequence[int] | None = None) -> LayoutResult:
    if not matches:
        raise ValueError("YOLO-L needs at least one target")
    ious = np.array([m.iou if m.matched else 0.0 for m in matches], dtype=np.float64)
    parts = []
    for i, m in enumerate(matches):
        label = _name(categories[i]) if categories is not None else f"target {i}"
        parts.append(f"{label} IoU {m.iou:.2f}" if m.matched else f"{label} unmatched")
    return LayoutResult(value=float(ious.mean()), at50=float((ious >= 0.5).mean()), reason="; ".join(parts))


def overlap_rect(
    a: Sequence[float], b: Sequence[float], image_size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """Pixel rectangle (x0, y0, x1, y1), end-exclusive, shared by two normalized boxes; None when empty."""
    w, h = image_size
    x0, y0 = round(max(a[0], b[0]) * w), round(max(a[1], b[1]) * h)
    x1, y1 = round(min(a[2], b[2]) * w), round(min(a[3], b[3]) * h)
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1), int(y1)


@dataclass(frozen=True)
class PairResult:
    front: int  # subject index with the higher z
    back: int
    correct: bool
    front_pixels: int | None  # mask pixels inside the overlap; None when the subject was not found
    back_pixels: int | None
    reason: str


def z_order_pairs(
    boxes: Sequence[Sequence[float]],
    zs: Sequence[int],
    categories: Sequence[int],
    masks: Sequence[np.ndarray | None],
    image_size: tuple[int, int],
) -> list[PairResult]:
    """Every overlapping pair of subjects, judged on its subjects' masks (None = subject not found)."""
    n = len(boxes)
    if not (len(zs) == len(categories) == len(masks) == n):
        raise ValueError("boxes, zs, categories and masks must have one entry per subject")
    out = []
    for i in range(n):
        for j in range(i + 1, n):
            rect = overlap_rect(boxes[i], boxes[j], image_size)
            if rect is None:
                continue
            front, back = (i, j) if zs[i] > zs[j] else (j, i)
            label = f"{_name(categories[front])} (z={zs[front]}) over {_name(categories[back])} (z={zs[back]})"
            missing = [k for k in (front, back) if masks[k] is None]
            if missing:
                lost = " and ".join(f"{_name(categories[k])} (z={zs[k]})" for k in missing)
                out.append(PairResult(front, back, False, _pixels(masks[front], rect), _pixels(masks[back], rect),
                                      f"{label}: {lost} not found"))  # fmt: skip
                continue
            pf, pb = _pixels(masks[front], rect), _pixels(masks[back], rect)
            verdict = "ok" if pf > pb else "wrong order"
            out.append(PairResult(front, back, pf > pb, pf, pb, f"{label}: {pf} vs {pb} px in the overlap, {verdict}"))
    return out


def _pixels(mask: np.ndarray | None, rect: tuple[int, int, int, int]) -> int | None:
    if mask is None:
        return None
    x0, y0, x1, y1 = rect
    return int(np.count_nonzero(mask[y0:y1, x0:x1]))
