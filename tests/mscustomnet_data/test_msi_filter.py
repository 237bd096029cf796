"""The saliency filter (Eq. 1-2): mask areas for polygons and RLE, crowds, beta's strictness, real-data counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mscustomnet.data.coco import (
    compute_mask_areas,
    filter_scenes,
    load_captions,
    load_instances,
    mask_area,
)


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_filter_matches_an_independent_count_on_coco_mini(coco_root: Path, split: str) -> None:
    path = coco_root / "annotations" / f"instances_{split}.json"
    # Independent count: pycocotools' COCO API, full decoded masks summed pixel by pixel.
    api = COCO(str(path))
    salient_ids, per_image = set(), Counter()
    for ann in api.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        image = api.imgs[ann["image_id"]]
        if api.annToMask(ann).sum() / (image["height"] * image["width"]) > 0.015:
            salient_ids.add(ann["id"])
            per_image[ann["image_id"]] += 1
    expected_scenes = sorted(i for i, c in per_image.items() if c >= 5)

    coco = load_instances(path)
    scenes = filter_scenes(coco, alpha=5, beta=0.015)
    assert scenes.image_ids == expected_scenes
    assert set(coco.ann_ids[scenes.salient].tolist()) == salient_ids
    for image_id, rows in scenes.scenes.items():
        assert len(rows) == per_image[image_id]
        assert not coco.iscrowd[rows].any()
    assert len(expected_scenes) > 10  # the slice does hold multi-subject scenes


def test_rle_and_crowd_annotations_of_coco_mini(coco_root: Path) -> None:
    path = coco_root / "annotations" / "instances_val2017.json"
    coco = load_instances(path)
    data = json.loads(path.read_text())
    crowds = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    rows = {a: i for i, a in enumerate(coco.ann_ids.tolist())}
    for ann in crowds:
        row = rows[ann["id"]]
        # Uncompressed RLE runs alternate background/foreground: the area is the sum of the foreground runs.
        assert coco.mask_areas[row] == sum(ann["segmentation"]["counts"][1::2])
        assert not filter_scenes(coco, alpha=1, beta=0.0).salient[row]


def test_polygon_union_rle_forms_and_degenerate_polygons() -> None:
    square = [0, 0, 10, 0, 10, 10, 0, 10]
    assert mask_area([square], 20, 20) == 100
    # Overlapping polygons of one instance: the mask is their union, not the sum.
    assert mask_area([square, square, [5, 0, 15, 0, 15, 10, 5, 10]], 20, 20) == 150
    # A 2-point "polygon" encloses nothing; pycocotools alone would read a 4-number first entry as a box.
    assert mask_area([[0, 0, 10, 10], square], 20, 20) == 100
    assert mask_area([[0, 0, 10, 10]], 20, 20) == 0

    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[2:9, 4:10] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    assert mask_area({"size": [20, 30], "counts": compressed["counts"].decode()}, 20, 30) == 42
    assert mask_area({"size": [20, 30], "counts": compressed["counts"]}, 20, 30) == 42
    flat = mask.flatten(order="F")
    starts = np.flatnonzero(np.diff(np.r_[0, flat, 0]))  # run boundaries, beginning with background
    counts = np.diff(np.r_[0, starts, flat.size]).tolist()
    assert mask_area({"size": [20, 30], "counts": counts}, 20, 30) == 42


def test_bad_segmentations_name_the_annotation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RLE size"):
        mask_area({"size": [5, 5], "counts": [25]}, 10, 10, where="x")
    images = [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}]
    categories = [{"id": 1, "name": "dog"}]
    bad = {"images": images, "categories": categories,
           "annotations": [{"id": 77, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 0,
                            "segmentation": [[0, 0, 1, 1, 2]]}]}  # fmt: skip
    path = tmp_path / "instances_bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"instances_bad.json: annotation 77"):
        load_instances(path)
    bad["annotations"][0].update(segmentation=[[0, 0, 5, 0, 5, 5]], image_id=2)
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"annotation 77 has a missing or unknown field"):
        load_instances(path)
    with pytest.raises(FileNotFoundError, match="instances_none.json"):
        load_instances(tmp_path / "instances_none.json")


def test_tiny_split_crowd_never_counts_and_beta_is_strict(tiny_coco: Path, tiny) -> None:
    coco = load_instances(tiny_coco / "annotations" / "instances_train2017.json")
    areas = dict(zip(coco.ann_ids.tolist(), coco.mask_areas.tolist(), strict=True))
    assert areas[101] == 2100  # dog: 4 bands + a duplicated band, their union
    assert areas[304] == 144  # compressed-RLE cup
    assert areas[105] == 600  # crowd band, uncompressed RLE
    assert areas[204] == 120  # cup at exactly beta * image area
    scenes = filter_scenes(coco, alpha=5, beta=0.015)
    assert scenes.image_ids == tiny.kept_by_filter
    salient = set(coco.ann_ids[scenes.salient].tolist())
    assert 204 not in salient and 104 in salient  # area / image area must exceed beta
    assert not salient & {105, 205, 305}  # crowds, although 600 px > beta
    # Image 2 has 4 salient subjects plus a large crowd: still dropped; at alpha 4 it is kept.
    assert 2 in filter_scenes(coco, alpha=4, beta=0.015).image_ids


def test_parallel_areas_equal_serial(coco_root: Path) -> None:
    data = json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    jobs = [(a["segmentation"], *sizes[a["image_id"]], a["id"]) for a in data["annotations"]]
    jobs = jobs * (20_001 // len(jobs) + 1)  # above the size where worker processes start
    serial = compute_mask_areas(jobs, workers=1)
    parallel = compute_mask_areas(jobs, workers=2)
    assert parallel.dtype == np.int64 and np.array_equal(serial, parallel)


def test_captions_by_image(coco_root: Path, tmp_path: Path) -> None:
    captions = load_captions(coco_root / "annotations" / "captions_train2017.json")
    assert len(captions) == 80 and all(captions.values())
    assert load_captions(tmp_path / "missing.json") == {}
