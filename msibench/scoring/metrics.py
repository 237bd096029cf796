"""Per-image detector metrics, as pure functions: YOLO-Subj, YOLO-L and Z-Acc.

Definitions (also in the README):

- YOLO-Subj: for a task with e_c expected and d_c detected instances of each of its categories c,
  sum_c min(e_c, d_c) / sum_c max(e_c, d_c); ``exact`` is 1 when d_c == e_c for every c of the task.
- YOLO-L: mean over target boxes of the IoU with the matched detection (0 when unmatched); YOLO-L@0.5 is the
  fraction of targets matched with IoU >= 0.5.
- Z-Acc pairs (:func:`z_pair_indices`): the pairs of subjects whose target boxes overlap by at least
  :data:`Z_MIN_OVERLAP` (5 %) of the smaller box's area, computed exactly (rational arithmetic on the boxes'
  decimal coordinates, :func:`overlap_fraction_exact`) once from the manifest's normalised boxes, so
  every method is judged on the same pairs whatever its output resolution, and a failed generation on the same
  pairs as a scored one. Below 5 % the shared region is a sliver (on MSIBench v1, 24 of the 252 overlapping
  pairs; most of them 1-3 % of the smaller box, a strip a few pixels wide at 256 px) whose verdict is decided by
  a few boundary pixels of the masks: noise, not depth order.
- Z-Acc verdict: the subject with the higher z is correct when, inside the shared rectangle (the smallest pixel
  rectangle covering the normalised intersection, so never empty), its instance mask covers strictly more
  pixels than the other subject's. A pair with a subject that was not found (no matched detection, or no mask)
  is wrong.
- Identity collapse (:func:`collapse`): see its docstring.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

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


# Part of the scorer version (scorer.py): pairs overlapping less than this fraction of the smaller box are no pair.
Z_MIN_OVERLAP = 0.05


def _exact(value: float) -> Fraction:
    """A box coordinate as the decimal it was written as: the shortest decimal that round-trips to the float
    (Python's repr), as a Fraction. Rational arithmetic on the float's binary value would not help: 0.42 - 0.40
    is already below 0.02 in binary."""
    return Fraction(float.__repr__(float(value)))


def overlap_fraction_exact(a: Sequence[float], b: Sequence[float]) -> Fraction:
    """:func:`overlap_fraction` in exact rational arithmetic on the boxes' decimal coordinates.

    In floats, boxes (0, 0, 0.42, 0.3) and (0.40, 0, 0.80, 0.3) overlap by (0.42 - 0.40) * 0.3 / 0.12 =
    0.0499999…, so a pair at exactly 5 % of the smaller box was dropped; exactly, it is 1/20."""
    a, b = [_exact(v) for v in a], [_exact(v) for v in b]
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return Fraction(0)
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else Fraction(0)


def overlap_fraction(a: Sequence[float], b: Sequence[float]) -> float:
    """Area of the intersection of two normalised boxes over the area of the smaller one (0 when disjoint)."""
    return float(overlap_fraction_exact(a, b))


def z_pair_indices(boxes: Sequence[Sequence[float]], min_overlap: float = Z_MIN_OVERLAP) -> list[tuple[int, int]]:
    """The Z-Acc pairs (i < j) of a task: target boxes overlapping by >= ``min_overlap`` of the smaller box."""
    n = len(boxes)
    threshold = _exact(min_overlap)
    return [
        (i, j) for i in range(n) for j in range(i + 1, n) if overlap_fraction_exact(boxes[i], boxes[j]) >= threshold
    ]


def overlap_rect(
    a: Sequence[float], b: Sequence[float], image_size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The smallest pixel rectangle (x0, y0, x1, y1), end-exclusive, covering the intersection of two normalised
    boxes (at least 1 x 1 pixel); None when the boxes do not overlap."""
    if overlap_fraction(a, b) <= 0.0:
        return None
    w, h = image_size
    # 1e-6 px absorbs float noise (0.6 * 10 = 6.000000000000001 must not reach pixel 7)
    x0 = min(max(math.floor(max(a[0], b[0]) * w + 1e-6), 0), w - 1)
    y0 = min(max(math.floor(max(a[1], b[1]) * h + 1e-6), 0), h - 1)
    x1 = max(min(math.ceil(min(a[2], b[2]) * w - 1e-6), w), x0 + 1)
    y1 = max(min(math.ceil(min(a[3], b[3]) * h - 1e-6), h), y0 + 1)
    return x0, y0, x1, y1


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
    min_overlap: float = Z_MIN_OVERLAP,
) -> list[PairResult]:
    """Every Z-Acc pair of the task (:func:`z_pair_indices`), judged on its subjects' masks (None = not found)."""
    n = len(boxes)
    if not (len(zs) == len(categories) == len(masks) == n):
        raise ValueError("boxes, zs, categories and masks must have one entry per subject")
    out = []
    for i, j in z_pair_indices(boxes, min_overlap):
        rect = overlap_rect(boxes[i], boxes[j], image_size)
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


COLLAPSE_SCOPES = ("other", "same")


@dataclass(frozen=True)
class CollapseResult:
    """Identity collapse of one multi-subject image (see :func:`collapse`)."""

    confused: tuple[bool | None, ...]  # per subject; None: not evaluable (no competing subject)
    rival: tuple[int | None, ...]  # per subject: the competing subject whose reference is closest to its crop
    n_confused: int
    n_subjects: int  # evaluable subjects
    reason: str


def collapse_evaluable(categories: Sequence[int], scope: str = "other") -> list[bool]:
    """Which subjects the collapse test of ``scope`` applies to: those with at least one subject of another
    category (``"other"``), or of the same category (``"same"``)."""
    if scope not in COLLAPSE_SCOPES:
        raise ValueError(f"scope must be one of {COLLAPSE_SCOPES}, got {scope!r}")
    n = len(categories)
    return [any((categories[r] != categories[j]) == (scope == "other") for r in range(n) if r != j) for j in range(n)]


def collapse(
    similarity: np.ndarray | Sequence[Sequence[float]],
    categories: Sequence[int],
    found: Sequence[bool] | None = None,
    scope: str = "other",
) -> CollapseResult:
    """Identity collapse (after "When Identities Collapse", arXiv 2603.26078) from the K x K similarities
    ``similarity[j, r]`` = cos(crop of subject j, reference of subject r) of one image.

    Subject j is *confused* when its crop is strictly closer to the reference of a competing subject r than to its
    own: similarity[j, r] > similarity[j, j]; ties are not confused (the crop is not closer to the other
    reference). A subject that was not found (``found[j]`` False: no crop, its row is ignored) is confused: its
    identity is not in the image, as a failed generation's subjects count as collapsed.

    ``scope`` says which subjects compete:
    - ``"other"``: subjects of other categories (a cat drawn like the dog's reference).
    - ``"same"``: subjects of the same category (two dogs drawn as one look-alike). Only meaningful when the crops
      were paired with the subjects by appearance (scorer.py, ``--identity-pairing appearance``): with that best
      assignment a crop closer to another same-category reference than to its own is a look-alike, not a swap.
      With positional pairing a swap of two perfect dogs would count, so the scorer does not compute it then.

    A subject without a competitor (its task has no other / no second subject of its category) is not evaluable
    and left out of the rate.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    k = len(categories)
    if sim.shape != (k, k):
        raise ValueError(f"similarity must be {k} x {k} for {k} subjects, got shape {sim.shape}")
    found = [True] * k if found is None else [bool(f) for f in found]
    if len(found) != k:
        raise ValueError(f"found must have one entry per subject ({k}), got {len(found)}")
    confused: list[bool | None] = []
    rival: list[int | None] = []
    parts = []
    for j, evaluable in enumerate(collapse_evaluable(categories, scope)):
        if not evaluable:
            confused.append(None)
            rival.append(None)
            continue
        if not found[j]:
            confused.append(True)
            rival.append(None)
            parts.append(f"{_name(categories[j])} (subject {j}) not found")
            continue
        same = scope == "same"
        others = [r for r in range(k) if r != j and (categories[r] == categories[j]) == same]
        r = max(others, key=lambda r: (sim[j, r], -r))  # the closest competing reference; the first on ties
        rival.append(r)
        is_confused = bool(sim[j, r] > sim[j, j])
        confused.append(is_confused)
        if is_confused:
            whose = f"subject {r}'s" if same else f"{_name(categories[r])}'s"
            parts.append(
                f"{_name(categories[j])} (subject {j}) closer to {whose} reference "
                f"({sim[j, r]:.3f} > own {sim[j, j]:.3f})"
            )
    n_subjects = sum(c is not None for c in confused)
    n_confused = sum(bool(c) for c in confused)
    if not n_subjects:
        reason = (
            "one category only: collapse not evaluated"
            if scope == "other"
            else "no two subjects of one category: same-category collapse not evaluated"
        )
    else:
        reason = f"{n_confused}/{n_subjects} subjects confused" + (": " + "; ".join(parts) if parts else "")
    return CollapseResult(tuple(confused), tuple(rival), n_confused, n_subjects, reason)
