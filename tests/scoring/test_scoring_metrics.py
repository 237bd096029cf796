"""Detector metrics on hand-made detections; every expected value is worked out by hand in the comments."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from msibench.coco import CATEGORY_ID
from msibench.scoring.detect import Detections
from msibench.scoring.match import box_iou, find_subjects, match_targets
from msibench.scoring.metrics import (
    collapse,
    collapse_evaluable,
    overlap_fraction,
    overlap_rect,
    yolo_l,
    yolo_subj,
    z_order_pairs,
    z_pair_indices,
)

DOG, CUP, CAT = CATEGORY_ID["dog"], CATEGORY_ID["cup"], CATEGORY_ID["cat"]


def test_yolo_subj_counts_and_reason():
    # expected 2 dog + 1 cup; found 1 dog, 1 cup and 3 cats (cats are not part of the task and do not count)
    res = yolo_subj(Counter({DOG: 2, CUP: 1}), Counter({DOG: 1, CUP: 1, CAT: 3}))
    # sum min = min(2,1) + min(1,1) = 2; sum max = max(2,1) + max(1,1) = 3
    assert res.value == pytest.approx(2 / 3)
    assert not res.exact
    assert "expected 2 dog, found 1" in res.reason
    assert "expected 1 cup, found 1" in res.reason


def test_yolo_subj_penalizes_extra_instances_and_exact_rate():
    # expected 1 dog, found 3: min 1 / max 3
    assert yolo_subj({DOG: 1}, {DOG: 3}).value == pytest.approx(1 / 3)
    exact = yolo_subj({DOG: 2, CUP: 1}, {DOG: 2, CUP: 1, CAT: 1})
    assert exact.value == 1.0 and exact.exact
    assert yolo_subj({DOG: 1}, {}).value == 0.0


def strip(x0: float, x1: float) -> list[float]:
    """A box spanning the full image height: its IoU with another strip is the 1-D interval IoU."""
    return [x0, 0.0, x1, 1.0]


def test_hungarian_matching_beats_greedy_and_drops_zero_iou():
    targets = [strip(0.0, 0.4), strip(0.3, 0.7), strip(0.8, 0.9)]
    # D0 = [0.05, 0.45]: IoU with T0 = 0.35 / 0.45 = 7/9, with T1 = 0.15 / 0.65 = 3/13
    # D1 = [0.00, 0.30]: IoU with T0 = 0.30 / 0.40 = 3/4, with T1 = 0
    # D2 = a cat exactly on T2: another category, must not match the dog target T2
    dets = Detections.build(
        [strip(0.05, 0.45), strip(0.0, 0.3), strip(0.8, 0.9)], [DOG, DOG, CAT], image_size=(100, 100)
    )
    assert box_iou(np.array([strip(0.0, 0.4)]), np.array([strip(0.05, 0.45)]))[0, 0] == pytest.approx(7 / 9)
    matches = match_targets(targets, [DOG, DOG, DOG], dets)
    # greedy would take T0-D0 (7/9) and leave T1 with D1 (IoU 0): total 7/9. Hungarian: T0-D1 + T1-D0 = 3/4 + 3/13
    assert [m.detection for m in matches] == [1, 0, None]
    assert matches[0].iou == pytest.approx(3 / 4)
    assert matches[1].iou == pytest.approx(3 / 13)
    assert not matches[2].matched and matches[2].iou == 0.0
    layout = yolo_l(matches, [DOG, DOG, DOG])
    assert layout.value == pytest.approx((3 / 4 + 3 / 13 + 0.0) / 3)
    assert layout.at50 == pytest.approx(1 / 3)  # only T0 (0.75) reaches IoU 0.5
    assert "dog unmatched" in layout.reason


def test_assigned_pair_with_zero_iou_stays_unmatched():
    # one dog target, one dog detection elsewhere: the assignment exists but has IoU 0
    dets = Detections.build([strip(0.6, 0.9)], [DOG], image_size=(10, 10))
    (m,) = match_targets([strip(0.0, 0.3)], [DOG], dets)
    assert m.detection is None and m.iou == 0.0


def box_mask(box, size=(10, 10), minus=()):
    """Boolean mask of a normalized box on a size (W, H) image, minus other boxes."""
    w, h = size
    mask = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    mask[y0:y1, x0:x1] = True
    for other in minus:
        mask &= ~box_mask(other, size)
    return mask


A_BOX, B_BOX, C_BOX = [0.0, 0.0, 0.6, 0.6], [0.4, 0.4, 1.0, 1.0], [0.8, 0.0, 1.0, 0.2]


def test_overlap_rect_in_pixels():
    # A and B share x 4..6, y 4..6 on a 10x10 image; A and C (x 8..10) share nothing
    assert overlap_rect(A_BOX, B_BOX, (10, 10)) == (4, 4, 6, 6)
    assert overlap_rect(A_BOX, C_BOX, (10, 10)) is None
    assert overlap_rect([0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], (10, 10)) is None  # touching edges only


def test_z_order_pairs_hand_cases():
    boxes, cats = [A_BOX, B_BOX, C_BOX], [DOG, CUP, CAT]
    zs = [1, 0, 2]  # A in front of B; C is in front of everything but overlaps nobody
    # A drawn over B: A covers the whole 2x2 overlap (4 px), B's visible mask none of it
    right = [box_mask(A_BOX), box_mask(B_BOX, minus=[A_BOX]), box_mask(C_BOX)]
    pairs = z_order_pairs(boxes, zs, cats, right, (10, 10))
    assert len(pairs) == 1  # only A-B overlap
    (p,) = pairs
    assert (p.front, p.back, p.front_pixels, p.back_pixels, p.correct) == (0, 1, 4, 0, True)
    # B drawn over A instead: 0 vs 4 px -> wrong
    wrong = [box_mask(A_BOX, minus=[B_BOX]), box_mask(B_BOX), box_mask(C_BOX)]
    (p,) = z_order_pairs(boxes, zs, cats, wrong, (10, 10))
    assert (p.front_pixels, p.back_pixels, p.correct) == (0, 4, False)
    assert "wrong order" in p.reason
    # a tie (both masks cover the overlap fully) is not "more pixels": wrong
    tie = [box_mask(A_BOX), box_mask(B_BOX), box_mask(C_BOX)]
    assert not z_order_pairs(boxes, zs, cats, tie, (10, 10))[0].correct
    # the back subject not found: the pair counts as wrong, and the reason says who is missing
    missing = [box_mask(A_BOX), None, box_mask(C_BOX)]
    (p,) = z_order_pairs(boxes, zs, cats, missing, (10, 10))
    assert not p.correct and p.back_pixels is None and "cup (z=0) not found" in p.reason


# ----------------------------------------------------------------------------- layout-free identity crop


def test_find_subjects_iou_first_then_most_confident_nearest_centre():
    # three dog targets; T0 is drawn where asked (D0 overlaps it), T1 and T2 were drawn elsewhere
    targets = [[0.0, 0.0, 0.2, 0.2], [0.8, 0.0, 1.0, 0.2], [0.8, 0.8, 1.0, 1.0]]
    dets = Detections.build(
        [
            [0.0, 0.0, 0.2, 0.2],  # D0: on T0 (IoU 1)
            [0.3, 0.6, 0.4, 0.7],  # D1: dog, conf 0.9, centre (0.35, 0.65): nearer T2's centre (0.9, 0.9)
            [0.6, 0.3, 0.7, 0.4],  # D2: dog, conf 0.8, centre (0.65, 0.35): nearer T1's centre (0.9, 0.1)
            [0.4, 0.4, 0.5, 0.5],  # D3: dog, conf 0.3: the least confident, left out (3 dogs asked, 4 found)
            [0.8, 0.0, 1.0, 0.2],  # D4: a cat exactly on T1: another category never stands in for a dog
        ],
        [DOG, DOG, DOG, DOG, CAT],
        scores=[0.5, 0.9, 0.8, 0.3, 0.99],
        image_size=(100, 100),
    )
    found = find_subjects(targets, [DOG, DOG, DOG], dets)
    assert [(f.detection, f.rule) for f in found] == [(0, "iou"), (2, "category"), (1, "category")]
    assert found[0].iou == pytest.approx(1.0) and found[1].iou == 0.0
    # the IoU matching of YOLO-L is untouched: T1 and T2 stay unmatched there
    assert [m.detection for m in match_targets(targets, [DOG, DOG, DOG], dets)] == [0, None, None]


def test_find_subjects_confidence_picks_the_instances_and_missing_subjects_are_not_found():
    # one dog asked and drawn away from its box: the most confident dog is its crop, not the nearest one
    dets = Detections.build(
        [[0.5, 0.5, 0.6, 0.6], [0.9, 0.9, 1.0, 1.0]], [DOG, DOG], scores=[0.4, 0.7], image_size=(10, 10)
    )
    (f,) = find_subjects([[0.4, 0.4, 0.45, 0.45]], [DOG], dets)
    assert (f.detection, f.rule) == (1, "category")
    # equal confidences: the detector's order
    tied = Detections.build([[0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.1, 0.1]], [DOG, DOG], image_size=(10, 10))
    assert find_subjects([[0.8, 0.8, 0.9, 0.9]], [DOG], tied)[0].detection == 0
    # two cups asked, one cup found: the cup away from both boxes goes to the nearer target, the other is not found
    one = Detections.build([[0.0, 0.45, 0.1, 0.55]], [CUP], image_size=(10, 10))
    found = find_subjects([[0.9, 0.4, 1.0, 0.6], [0.2, 0.4, 0.3, 0.6]], [CUP, CUP], one)
    assert [f.detection for f in found] == [None, 0] and not found[0].found


# ----------------------------------------------------------------------------- Z-Acc pairs


def test_z_pairs_come_from_normalised_boxes_with_a_minimum_overlap():
    a = [0.0, 0.0, 0.5, 0.5]
    sliver = [0.49, 0.49, 1.0, 1.0]  # 0.01^2 / 0.25 = 0.04 % of the smaller box
    four = [0.4, 0.4, 1.0, 1.0]  # 0.1^2 / 0.25 = 4 %: below the 5 % minimum
    six = [0.38, 0.38, 1.0, 1.0]  # 0.12^2 / 0.25 = 5.76 %
    assert overlap_fraction(a, sliver) == pytest.approx(0.0004)
    assert (
        z_pair_indices([a, sliver]) == [] and z_pair_indices([a, four]) == [] and z_pair_indices([a, six]) == [(0, 1)]
    )
    # the pair set, and so the denominator, is the same at every output resolution
    for boxes in ([a, sliver], [a, four], [a, six], [a, six, sliver]):
        counts = set()
        for size in ((10, 10), (37, 37), (256, 256), (512, 512), (300, 200)):
            masks = [box_mask(b, size) for b in boxes]
            counts.add(len(z_order_pairs(boxes, list(range(len(boxes))), [DOG] * len(boxes), masks, size)))
        assert len(counts) == 1, boxes
    # the pixel rectangle of a pair is never empty, even where the overlap is under a pixel
    (p,) = z_order_pairs([a, six], [1, 0], [DOG, CUP], [box_mask(a, (4, 4)), box_mask(six, (4, 4))], (4, 4))
    assert p.front_pixels is not None and p.front_pixels + p.back_pixels > 0


# ----------------------------------------------------------------------------- identity collapse


def test_collapse_from_hand_made_similarity_matrices():
    # rows: subject crops; columns: the subjects' references
    sim = [
        [0.70, 0.50, 0.20],  # dog: closest to its own reference
        [0.80, 0.60, 0.30],  # cat: closer to the dog's reference (0.80 > 0.60): confused
        [0.10, 0.40, 0.40],  # cup: tie with the cat's reference (0.40 = 0.40): not closer, not confused
    ]
    res = collapse(sim, [DOG, CAT, CUP])
    assert res.confused == (False, True, False) and res.rival == (1, 0, 1)
    assert (res.n_confused, res.n_subjects) == (1, 3)
    assert "cat (subject 1) closer to dog's reference (0.800 > own 0.600)" in res.reason
    # every subject a clone of the first reference: all confused but the first
    clones = collapse([[0.9, 0.2], [0.9, 0.3]], [DOG, CAT])
    assert clones.confused == (False, True)


def test_collapse_ignores_same_category_references():
    # two dogs and a cup: dog 1 is closer to dog 0's reference, which does not count; the cup's reference does
    sim = [
        [0.8, 0.9, 0.1],
        [0.9, 0.7, 0.75],
        [0.2, 0.2, 0.5],
    ]
    res = collapse(sim, [DOG, DOG, CUP])
    assert res.confused == (False, True, False) and res.rival == (2, 2, 0)
    # one category only: nothing to confuse with, not evaluated
    alone = collapse([[0.5, 0.9], [0.9, 0.5]], [DOG, DOG])
    assert alone.confused == (None, None) and alone.n_subjects == 0 and "not evaluated" in alone.reason
    assert collapse_evaluable([DOG, DOG, CUP]) == [True, True, True] and collapse_evaluable([DOG, DOG]) == [False] * 2
    with pytest.raises(ValueError, match="3 x 3"):
        collapse([[1.0]], [DOG, CAT, CUP])


def test_a_grazing_detection_is_no_match_so_the_confident_one_elsewhere_is_found():
    """The issue's case: a 0.26-confidence dog grazing the target box at IoU ~0.001 used to be matched (any overlap
    counted) and became the subject's crop, leaving the 0.95 dog elsewhere unused. Below MIN_MATCH_IOU it is no
    match; the layout-free crop then takes the most confident dog."""
    from msibench.scoring.match import MIN_MATCH_IOU

    assert MIN_MATCH_IOU == 0.1
    target = [0.10, 0.10, 0.50, 0.50]
    grazing = [0.499, 0.10, 0.90, 0.50]  # shares a 0.001-wide strip: IoU 0.0004 / 0.32 ~ 0.001
    elsewhere = [0.55, 0.55, 0.95, 0.95]
    det = Detections.build([grazing, elsewhere], [DOG, DOG], image_size=(100, 100), scores=[0.26, 0.95])
    assert 0 < box_iou([target], [grazing])[0, 0] < 0.002
    (m,) = match_targets([target], [DOG], det)
    assert not m.matched and m.iou == 0.0
    (f,) = find_subjects([target], [DOG], det)
    assert (f.detection, f.rule) == (1, "category")
    # at the threshold itself a detection matches: IoU of [0, 0, 1, 0.1] with [0, 0, 1, 1] is exactly 0.1
    edge = Detections.build([[0.0, 0.0, 1.0, 0.1]], [DOG], image_size=(100, 100))
    (m,) = match_targets([[0.0, 0.0, 1.0, 1.0]], [DOG], edge)
    assert m.matched and m.iou == pytest.approx(0.1)
    # just below it does not
    below = Detections.build([[0.0, 0.0, 1.0, 0.0999]], [DOG], image_size=(100, 100))
    assert not match_targets([[0.0, 0.0, 1.0, 1.0]], [DOG], below)[0].matched


def test_z_pair_at_exactly_five_percent_of_the_smaller_box_is_a_pair():
    """(0.42 - 0.40) * 0.3 / 0.12 is 0.0499999... in floats, which failed >= 0.05; the overlap is computed exactly
    on the boxes' decimals, so this pair is in and one a hair below is out."""
    from fractions import Fraction

    from msibench.scoring.metrics import overlap_fraction_exact

    a, b = [0.0, 0.0, 0.42, 0.3], [0.40, 0.0, 0.80, 0.3]  # b is the smaller box (0.12); overlap 0.02 x 0.3
    assert (0.42 - 0.40) * 0.3 / 0.12 < 0.05  # the float arithmetic the old rule used
    assert overlap_fraction_exact(a, b) == Fraction(1, 20)
    assert z_pair_indices([a, b]) == [(0, 1)]
    assert z_pair_indices([[0.0, 0.0, 0.4199, 0.3], b]) == []


def test_collapse_among_same_category_subjects_and_not_found_subjects():
    # two dogs and a cup. Crops after the appearance pairing: dog 0 looks like itself; dog 1 looks more like dog 0's
    # reference (0.7 > own 0.6): a look-alike; the cup was not found (its row is ignored).
    sim = np.array([[0.9, 0.5, 0.1], [0.7, 0.6, 0.2], [np.nan, np.nan, np.nan]])
    same = collapse(sim, [DOG, DOG, CUP], found=[True, True, False], scope="same")
    assert same.confused == (False, True, None)  # the cup has no second cup: not evaluable
    assert (same.n_confused, same.n_subjects, same.rival) == (1, 2, (1, 0, None))
    assert "dog (subject 1) closer to subject 0's reference (0.700 > own 0.600)" in same.reason
    other = collapse(sim, [DOG, DOG, CUP], found=[True, True, False])
    # across categories nobody is closer to another category's reference; the cup, not found, is confused
    assert other.confused == (False, False, True) and (other.n_confused, other.n_subjects) == (1, 3)
    assert "cup (subject 2) not found" in other.reason
    assert collapse_evaluable([DOG, DOG, CUP], "same") == [True, True, False]
    with pytest.raises(ValueError, match="scope"):
        collapse(sim, [DOG, DOG, CUP], scope="both")
