from __future__ import annotations

import json
from collections import Counter

import pytest
from pycocotools import mask as mask_utils

from msibench.bench.build import BuildParams, build_manifest
from msibench.bench.manifest import ManifestError, default_manifest_path, dumps, load_manifest


@pytest.fixture(scope="module")
def built(coco_root):
    return build_manifest(coco_root, BuildParams(seed=0))


@pytest.fixture(scope="module")
def coco_val(coco_root):
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    anns = {a["id"]: a for a in data["annotations"]}
    return images, anns


def _area(ann, image):
    seg, h, w = ann["segmentation"], image["height"], image["width"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    else:
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
    return float(mask_utils.area(rle))


def test_build_is_deterministic_and_matches_packaged_v1(coco_root, built):
    again = build_manifest(coco_root, BuildParams(seed=0))
    assert dumps(built) == dumps(again)
    # The committed v1 manifest is exactly what the builder makes from the COCO slice.
    assert dumps(built) == default_manifest_path().read_bytes()
    other = build_manifest(coco_root, BuildParams(seed=1))
    assert dumps(other) != dumps(built)


def test_track_split(built):
    per = Counter((t["track"], len(t["subjects"])) for t in built["tasks"])
    assert per == {("multi", 2): 25, ("multi", 3): 25, ("multi", 4): 25, ("multi", 5): 25, ("single", 1): 100}
    multi_scenes = [t["scene"]["image_id"] for t in built["tasks"] if t["track"] == "multi"]
    assert len(set(multi_scenes)) == 100  # distinct scenes: the slice allows it
    assert built["build"]["stats"]["multi"]["scenes_reused"] == 0


def test_references_never_the_scene_instance(built, coco_val):
    _, anns = coco_val
    for task in built["tasks"]:
        scene = task["scene"]["image_id"]
        for s in task["subjects"]:
            ref = anns[s["reference"]["annotation_id"]]
            assert s["reference"]["image_id"] == ref["image_id"] != scene
            assert ref["category_id"] == s["category_id"] and not ref["iscrowd"]
        # Subjects of one category get different reference instances as far as the data has them.
        per_cat: dict[int, list[int]] = {}
        for s in task["subjects"]:
            per_cat.setdefault(s["category_id"], []).append(s["reference"]["annotation_id"])
        for cat, refs in per_cat.items():
            available = [
                a
                for a in anns.values()
                if a["category_id"] == cat and a["image_id"] != scene and not a["iscrowd"] and min(a["bbox"][2:]) >= 32
            ]
            assert len(set(refs)) == min(len(refs), len(available)), task["id"]


def test_subjects_are_salient_and_zorder_follows_mask_area(built, coco_val):
    images, anns = coco_val
    for task in (t for t in built["tasks"] if t["track"] == "multi"):
        image = images[task["scene"]["image_id"]]
        areas = []
        for s in task["subjects"]:
            ann = anns[s["scene_annotation_id"]]
            assert ann["image_id"] == image["id"] and ann["category_id"] == s["category_id"]
            assert not ann["iscrowd"]
            area = _area(ann, image)
            assert area / (image["width"] * image["height"]) > 0.015
            areas.append((area, s["z"]))
        # smaller mask = nearer = higher z
        by_z = [a for a, _ in sorted(areas, key=lambda p: p[1])]
        assert by_z == sorted(by_z, reverse=True), task["id"]


def test_boxes_letterboxed_to_square_canvas(built, coco_val):
    images, anns = coco_val
    for task in built["tasks"][:40]:
        image = images[task["scene"]["image_id"]]
        side = max(image["width"], image["height"])
        for s in task["subjects"]:
            x, y, w, h = anns[s["scene_annotation_id"]]["bbox"]
            x0, y0, x1, y1 = s["box"]
            assert (x1 - x0) * side == pytest.approx(w, abs=0.01)
            assert (y1 - y0) * side == pytest.approx(h, abs=0.01)
            assert x0 * side == pytest.approx(x + (side - image["width"]) / 2, abs=0.01)


def test_single_track_covers_many_categories(built):
    cats = Counter(t["subjects"][0]["category"] for t in built["tasks"] if t["track"] == "single")
    assert len(cats) == built["build"]["stats"]["single"]["categories"] >= 60
    # Categories are visited round-robin: with 100 tasks over more than 50 categories none is used 3 times.
    assert len(cats) > 50 and max(cats.values()) == 2


def test_sources_pin_every_reference_file(built):
    ids = {s["image_id"] for s in built["sources"]}
    for task in built["tasks"]:
        for s in task["subjects"]:
            assert s["reference"]["image_id"] in ids
    for src in built["sources"]:
        assert len(src["sha256"]) == 64 and src["coco_url"].endswith(src["file_name"])


def _write(tmp_path, manifest):
    path = tmp_path / "m.json"
    path.write_bytes(dumps(manifest))
    return path


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: m["tasks"][3]["subjects"][1].__setitem__("box", [0.5, 0.2, 0.4, 0.9]), "subjects[1].box"),
        (lambda m: m["tasks"][3]["subjects"][0].__setitem__("z", "front"), "subjects[0].z"),
        (lambda m: m["tasks"][3].pop("prompt"), "'prompt': missing"),
        (lambda m: m["tasks"][3].__setitem__("track", "triple"), "'track'"),
        (
            lambda m: m["tasks"][3]["subjects"][0]["reference"].__setitem__("crop", [0, 0, 99999, 5]),
            "subjects[0].reference.crop",
        ),
    ],
)
def test_bad_field_error_names_task_and_field(tmp_path, built, mutate, expected):
    manifest = json.loads(dumps(built))
    task_id = manifest["tasks"][3]["id"]
    mutate(manifest)
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(tmp_path, manifest))
    message = str(err.value)
    assert f"task {task_id!r}" in message and expected in message and "m.json" in message


def test_bad_source_checksum_field(tmp_path, built):
    manifest = json.loads(dumps(built))
    manifest["sources"][2]["sha256"] = "xyz"
    with pytest.raises(ManifestError, match=r"sources\[2\].*sha256"):
        load_manifest(_write(tmp_path, manifest))


def test_packaged_manifest_loads():
    m = load_manifest()
    assert len(m.tasks) == 200 and m.version == "1"
    assert [t.k for t in m.select("multi", limit=3)] == [2, 2, 2]
    assert len(m.select("all", limit=2)) == 4
