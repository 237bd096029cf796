"""The reference-quality rule shared by MSIBench and the MSI pools, on real COCO slice instances whose verdicts were
checked by eye (cut-out and photo), and on small synthetic cases for each definition."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msibench.bench import quality as q
from msibench.coco import decode_mask

# val2017 annotation id -> the causes the rule must find. Each was looked at as a cut-out and in its photo.
HAND_CHECKED = {
    # good references: whole, unoccluded, one object
    586848: (),  # polar bear
    125303: (),  # bicycle, both wheels
    270041: (),  # stop sign
    332341: (),  # refrigerator
    472373: (),  # man throwing
    139476: (),  # taxi: its driver (2029719) lies inside the car's mask and is cut out (3.6 % of it)
    # fragments: pieces of an object cut by something in front of it
    129693: ("fragment",),  # half a bicycle: two parts, the larger holds 52 % of the mask
    1551488: ("fragment",),  # apple in two pieces
    1394203: ("fragment",),  # slivers of a bench
    # containers: other objects lie inside the mask
    414619: ("truncated", "container"),  # dining table with 2 bottles, 2 wine glasses, a spoon, a bowl, pizza, fork
    120990: ("truncated", "container"),  # dining table with plates, a knife, a bowl
    1038063: ("container",),  # bowl of broccoli
    1072171: ("container",),  # pizza whose broccoli toppings are annotated
    # occluded: other instances touching it cover much of its box
    1378100: ("occluded",),  # narrowboat behind another
    136684: ("occluded",),  # back of a car behind others
    # truncated by the frame
    450473: ("truncated",),  # batter cut by the bottom edge (its polygon stops 4.6 px above it)
    571226: ("truncated",),  # half a person at the right edge
    # a thin sliver (also small and a fragment of its box)
    1528619: ("small", "fragment", "sliver"),  # spoon seen edge-on, 6 px thick
}


@pytest.fixture(scope="module")
def val_verdicts(coco_root):
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    wanted = {a["image_id"] for a in data["annotations"] if a["id"] in HAND_CHECKED}
    verdicts = {}
    for image_id in sorted(wanted):
        anns = [a for a in data["annotations"] if a["image_id"] == image_id]
        image = images[image_id]
        verdicts.update(q.assess_annotations(anns, image["width"], image["height"], decode_mask))
    return verdicts, data, images


@pytest.mark.parametrize("ann_id", sorted(HAND_CHECKED))
def test_hand_checked_slice_instances(val_verdicts, ann_id):
    verdicts, _, _ = val_verdicts
    verdict = verdicts[ann_id]
    assert verdict.causes == HAND_CHECKED[ann_id], verdict.to_json()
    assert verdict.clean == (not HAND_CHECKED[ann_id])


def test_the_dining_table_of_the_issue_is_a_container(val_verdicts):
    verdicts, _, _ = val_verdicts
    table = verdicts[414619]
    assert len(table.contained) == 8 and table.contained_fraction > q.MAX_CONTAINED_FRACTION
    assert table.subtracted == ()  # rejected, so nothing is cut out of it


def test_small_contained_instances_are_subtracted_from_the_mask(val_verdicts):
    verdicts, data, images = val_verdicts
    taxi = verdicts[139476]
    assert taxi.clean and taxi.contained == taxi.subtracted == (2029719,)
    image = images[next(a["image_id"] for a in data["annotations"] if a["id"] == 139476)]
    anns = sorted((a for a in data["annotations"] if a["image_id"] == image["id"]), key=lambda a: a["id"])
    h, w = image["height"], image["width"]
    instances = [q.PhotoInstance(a["id"], a["category_id"], tuple(a["bbox"]), bool(a["iscrowd"])) for a in anns]
    masks = [decode_mask(a["segmentation"], h, w).astype(bool) for a in anns]
    cleaned = q.reference_mask(taxi, instances, masks)
    own = masks[[a["id"] for a in anns].index(139476)]
    driver = masks[[a["id"] for a in anns].index(2029719)]
    assert np.array_equal(cleaned, own & ~driver) and cleaned.sum() == taxi.mask_area < own.sum()


def test_ranking_puts_clean_references_first(val_verdicts):
    verdicts, _, _ = val_verdicts
    ranked = sorted(verdicts.values(), key=q.rank_key)
    clean = [v.clean for v in ranked]
    assert clean == sorted(clean, reverse=True)
    scores = [v.score for v in ranked if v.clean]
    assert scores == sorted(scores, reverse=True)


# ------------------------------------------------------------------------------------------------ synthetic cases


def _rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _inst(ann_id: int, mask: np.ndarray, crowd: bool = False) -> q.PhotoInstance:
    ys, xs = np.nonzero(mask)
    bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min()))
    return q.PhotoInstance(ann_id, 1, bbox, crowd)


def test_only_touching_instances_occlude():
    h, w = 400, 400
    subject = _rect(h, w, 100, 100, 300, 300)
    subject[100:200, 100:200] = False  # its top-left quarter is missing ...
    near = _rect(h, w, 100, 100, 200, 200)  # ... hidden by an instance lying right there
    far = _rect(h, w, 110, 110, 190, 190)  # the same hole, but the other instance does not reach the subject
    touching = q.assess_photo([_inst(1, subject), _inst(2, near)], [subject, near], w, h)[1]
    assert touching.occlusion == pytest.approx(0.25) and touching.causes == ("occluded",)
    assert touching.occluders == (2,)
    apart = q.assess_photo([_inst(1, subject), _inst(2, far)], [subject, far], w, h)[1]
    assert apart.occlusion == 0.0 and apart.occluders == () and apart.clean


def test_crowd_regions_occlude_but_are_never_assessed():
    h, w = 400, 400
    subject = _rect(h, w, 100, 100, 300, 300)
    subject[100:200, 100:200] = False  # an L: its box keeps the missing quarter
    crowd = _rect(h, w, 90, 90, 200, 200)
    verdicts = q.assess_photo([_inst(1, subject), _inst(2, crowd, crowd=True)], [subject, crowd], w, h)
    assert set(verdicts) == {1} and "occluded" in verdicts[1].causes


def test_containment_is_subtracted_below_the_threshold_and_rejected_above():
    h, w = 400, 400
    table = _rect(h, w, 50, 50, 350, 350)  # 90,000 px
    cup = _rect(h, w, 100, 100, 160, 160)  # 3,600 px = 4 % of the table, inside its mask
    verdict = q.assess_photo([_inst(1, table), _inst(2, cup)], [table, cup], w, h)[1]
    assert verdict.clean and verdict.subtracted == (2,) and verdict.mask_area == 90_000 - 3_600
    bottle = _rect(h, w, 200, 200, 260, 260)  # together 8 %: a container
    verdict = q.assess_photo([_inst(1, table), _inst(2, cup), _inst(3, bottle)], [table, cup, bottle], w, h)[1]
    assert verdict.causes == ("container",) and verdict.subtracted == () and verdict.contained == (2, 3)


def test_truncation_needs_the_mask_to_run_along_the_border():
    h, w = 300, 400
    # A box 3 px from the bottom edge, but the mask reaches the border band at one narrow foot only: whole.
    body = _rect(h, w, 100, 50, 300, 250)
    body[250:297, 190:210] = True
    assert q.assess_photo([_inst(1, body)], [body], w, h)[1].clean
    # The same object cut straight along the bottom edge.
    cut = _rect(h, w, 100, 50, 300, 296)
    assert q.assess_photo([_inst(1, cut)], [cut], w, h)[1].causes == ("truncated",)


def test_fragments_slivers_small_and_empty():
    h, w = 400, 400
    two_parts = _rect(h, w, 50, 50, 150, 300) | _rect(h, w, 200, 50, 300, 300)
    assert q.assess_photo([_inst(1, two_parts)], [two_parts], w, h)[1].causes == ("fragment",)
    strip = _rect(h, w, 50, 100, 350, 110)  # 10 px thick
    assert "sliver" in q.assess_photo([_inst(1, strip)], [strip], w, h)[1].causes
    small = _rect(h, w, 100, 100, 160, 200)  # 60 px wide
    assert q.assess_photo([_inst(1, small)], [small], w, h)[1].causes == ("small",)
    empty = np.zeros((h, w), dtype=bool)
    inst = q.PhotoInstance(1, 1, (100.0, 100.0, 100.0, 100.0))
    assert q.assess_photo([inst], [empty], w, h)[1].causes[0] == "empty"


def test_wrong_mask_shape_names_the_annotation():
    with pytest.raises(ValueError, match="annotation 7"):
        q.assess_photo([q.PhotoInstance(7, 1, (0.0, 0.0, 5.0, 5.0))], [np.zeros((4, 4), bool)], 10, 10)


def test_cutouts_keep_contained_instances_instead_of_holes(val_verdicts):
    """Issue 22: a contained instance small enough to keep (a driver behind a windscreen, a held phone) stays in the
    reference cut-out: nothing is subtracted from the mask a reference is cut with, so it has no hole."""
    verdicts, _, _ = val_verdicts
    taxi = verdicts[139476]
    assert q.CUTOUT_KEEPS_CONTAINED is True
    assert taxi.clean and taxi.subtracted == (2029719,)  # what the rule measured without it
    assert q.cutout_subtracted(taxi) == ()
