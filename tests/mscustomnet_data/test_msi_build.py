"""The MSI builder: tuples, layout maps, reference pools, skipping, determinism and resume."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mscustomnet.data.build import MSI_FALLBACK_CAUSES, BuildConfig, PoolEntry, build_msi, category_prompt, plan_scene
from mscustomnet.data.coco import load_instances
from msibench.bench.quality import BLURRED_CAUSE, assess_annotations
from msibench.coco import decode_mask, load_split


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_occlusion_order_smaller_on_top_in_layout_pixels(tiny_build: Path, tiny) -> None:
    scene = next(r for r in read_jsonl(tiny_build / "manifest.jsonl") if r["image_id"] == 4)
    by_name = {s["category"]: s for s in scene["subjects"]}
    # z-rank follows mask area (dog 2100 > bus 1225 > kite 600 > cat 400 > cup 144), not annotation id.
    assert [by_name[n]["z_rank"] for n in ("dog", "bus", "kite", "cat", "cup")] == [0, 1, 2, 3, 4]
    assert by_name["cat"]["ann_id"] < by_name["dog"]["ann_id"]
    layout = np.asarray(Image.open(tiny_build / scene["layout_map"]))
    assert layout.shape == (tiny.height, tiny.width, 3)  # original size
    colors = tiny.colors
    # The cat sits at (10..30, 10..30) inside the dog box; the dog references (cut from images 1-3, whose cats sit at
    # 30..50) have dog pixels there, so only the paint order decides which colour shows.
    assert tuple(layout[20, 20]) == colors["cat"]
    assert tuple(layout[7, 7]) == colors["dog"]
    # Pasted through the mask: the dog reference's hole (where its own photo's cat was) stays zero.
    assert tuple(layout[40, 40]) == (0, 0, 0)
    assert tuple(layout[15, 75]) == colors["kite"] and tuple(layout[47, 77]) == colors["bus"]
    assert tuple(layout[64, 11]) == colors["cup"]
    assert tuple(layout[77, 50]) == (0, 0, 0)  # crowd: not a subject, no layout
    assert tuple(layout[2, 2]) == (0, 0, 0)  # zero canvas


def test_manifest_stats_and_skipped_images(tiny_coco: Path, tiny, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mscustomnet.data.build"):
        summary = build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=tmp_path), progress=False)
    records = read_jsonl(tmp_path / "manifest.jsonl")
    assert [r["image_id"] for r in records] == tiny.written
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (summary.scenes_kept, summary.scenes_written, summary.scenes_skipped) == (5, 3, 2)
    assert stats["scenes_kept"] == 5 and stats["scenes_written"] == 3
    assert stats["subjects_per_scene"] == {"5": 3}
    assert {s["image_id"] for s in stats["skipped"]} == {5, 6}
    reasons = {s["image_id"]: s["reason"] for s in stats["skipped"]}
    assert "missing" in reasons[5] and "truncated" in reasons[6]
    assert "scene 5 skipped" in caplog.text and "scene 6 skipped" in caplog.text
    assert {s["image_id"] for s in stats["pool_skipped"]} == {5, 6}
    # Every tiny instance is rejected by the reference rule (boxes under 64 px; the dog's box also runs along the
    # top and left edges within 8 px), so pools hold the best-ranked rejected candidates and stats say so.
    assert stats["per_category"]["dog"] == {
        "category_id": 1, "subjects": 3, "subjects_with_rejected_reference": 3, "scenes": 3, "pool": 4,
        "pool_clean": 0, "candidates": 6, "clean_candidates": 0, "rejected_candidates": 6,
        "rejected_by_cause": {"truncated": 6, "small": 6},
    }  # fmt: skip
    assert stats["per_category"]["cat"]["rejected_by_cause"] == {"small": 6}
    # The 10 x 12 cup of image 2 is nowhere 12 px thick.
    assert stats["reference_rule"]["rejected_by_cause"]["sliver"] == 1
    assert stats["reference_rule"]["candidates"] == 30 and stats["reference_rule"]["clean"] == 0
    assert stats["per_category"]["person"]["subjects"] == 0  # crowd only
    by_id = {r["image_id"]: r for r in records}
    assert by_id[1]["caption_source"] == "coco"
    assert by_id[1]["caption"] in {"A dog, a cat and a kite near a bus.", "Animals by a bus with a cup."}
    assert by_id[4]["caption_source"] == "categories"
    assert by_id[4]["caption"] == "a photo of a bus, a cat, a cup, a dog and a kite"
    for record in records:
        assert (record["width"], record["height"]) == (tiny.width, tiny.height)
        for subject in record["subjects"]:
            boxes = tiny.scene_boxes(record["image_id"])
            x0, y0, x1, y1 = boxes[subject["category"]]
            assert subject["bbox"] == [x0, y0, x1 - x0, y1 - y0]


def test_reference_is_never_from_the_scene_itself(tiny_build: Path, mini_train_build: Path) -> None:
    for build in (tiny_build, mini_train_build):
        pool = json.loads((build / "pool.json").read_text())
        pooled = {e["ann_id"]: e for entries in pool["categories"].values() for e in entries}
        records = read_jsonl(build / "manifest.jsonl")
        own_in_pool = 0
        for record in records:
            own = {s["ann_id"] for s in record["subjects"]}
            own_in_pool += len(own & set(pooled))
            for subject in record["subjects"]:
                reference = pooled[subject["reference_id"]]
                assert reference["image_id"] != record["image_id"]
                assert subject["reference_id"] not in own
                assert reference["category_id"] == subject["category_id"]
        assert own_in_pool > 0  # the exclusion was exercised: scenes' own instances do sit in the pools


def test_pools_rank_quality_and_cut_references(mini_train_build: Path, coco_root: Path) -> None:
    pool = json.loads((mini_train_build / "pool.json").read_text())
    coco = load_split(coco_root, "train2017")
    by_image: dict[int, list[dict]] = {}
    for ann in coco.annotations:
        by_image.setdefault(ann["image_id"], []).append(ann)

    def verdicts(image_id: int) -> dict:
        image = coco.images[image_id]
        return assess_annotations(by_image[image_id], image["width"], image["height"], decode_mask)

    for entries in pool["categories"].values():
        assert len(entries) <= 30
        # A container, a fragment, a sliver or a fallback spanning the frame never enters a pool; truncated, small,
        # occluded or blurred instances only fill pools whose category lacks clean ones.
        assert all(set(e["causes"]) <= set(MSI_FALLBACK_CAUSES) for e in entries)
        # Clean references first, then rejected ones; within each, every photo's first instance before any photo's
        # second.
        cleans = [e["clean"] for e in entries]
        assert cleans == sorted(cleans, reverse=True) and all(e["clean"] == (not e["causes"]) for e in entries)
        for group in (True, False):
            photos = [e["image_id"] for e in entries if e["clean"] == group]
            firsts = [i for i, p in enumerate(photos) if p not in photos[:i]]
            assert firsts == list(range(len(firsts)))
    # The verdicts in pool.json are the shared rule's, recomputed here from the annotations (a clean one may be
    # blurred: see test_msi_pool_rules.py).
    person = pool["categories"]["1"]
    for entry in person[:3] + person[-2:]:
        verdict = verdicts(entry["image_id"])[entry["ann_id"]]
        causes = [] if entry["causes"] == [BLURRED_CAUSE] else entry["causes"]
        assert list(verdict.causes) == causes and verdict.mask_area == entry["mask_area"]
    best = person[0]
    assert best["clean"]
    x, y, w, h = best["bbox"]
    rgb = np.asarray(Image.open(mini_train_build / best["file"]))
    mask = np.asarray(Image.open(mini_train_build / best["mask_file"])) > 0
    assert rgb.shape[:2] == mask.shape == (int(np.ceil(y + h)) - int(y), int(np.ceil(x + w)) - int(x))
    assert mask.sum() == best["mask_area"]  # the whole (cleaned) instance mask lies in its box, at original size
    assert (rgb[~mask] == 255).all() and (rgb[mask] != 255).any()
    # A reference with contained instances cut out: its saved mask is its own mask minus theirs.
    cut = next(e for entries in pool["categories"].values() for e in entries if e["subtracted"])
    image = coco.images[cut["image_id"]]
    anns = {a["id"]: a for a in by_image[cut["image_id"]]}
    own = decode_mask(anns[cut["ann_id"]]["segmentation"], image["height"], image["width"]).astype(bool)
    for other in cut["subtracted"]:
        own &= ~decode_mask(anns[other]["segmentation"], image["height"], image["width"]).astype(bool)
    x0, y0 = int(np.floor(cut["bbox"][0])), int(np.floor(cut["bbox"][1]))
    saved = np.asarray(Image.open(mini_train_build / cut["mask_file"])) > 0
    assert np.array_equal(saved, own[y0 : y0 + saved.shape[0], x0 : x0 + saved.shape[1]])


def test_stats_report_the_rule_per_category_and_cause(mini_train_build: Path) -> None:
    stats = json.loads((mini_train_build / "stats.json").read_text())
    pool = json.loads((mini_train_build / "pool.json").read_text())
    rule = stats["reference_rule"]
    per = stats["per_category"]
    assert rule["candidates"] == sum(c["candidates"] for c in per.values()) == rule["clean"] + rule["rejected"]
    for cause in ("truncated", "small", "container", "occluded", "fragment", "sliver"):
        assert rule["rejected_by_cause"][cause] == sum(c["rejected_by_cause"].get(cause, 0) for c in per.values())
        assert rule["rejected_by_cause"][cause] > 0  # the slice exercises every cause
    assert rule["pool_clean"] == sum(e["clean"] for entries in pool["categories"].values() for e in entries)
    records = read_jsonl(mini_train_build / "manifest.jsonl")
    fallback = sum(not s["reference_clean"] for r in records for s in r["subjects"])
    assert stats["subjects_with_rejected_reference"] == fallback > 0


def test_a_scene_never_gets_the_same_reference_twice(mini_train_build: Path) -> None:
    pool = json.loads((mini_train_build / "pool.json").read_text())
    pooled = {e["ann_id"]: e for entries in pool["categories"].values() for e in entries}
    for record in read_jsonl(mini_train_build / "manifest.jsonl"):
        refs = [s["reference_id"] for s in record["subjects"]]
        assert len(set(refs)) == len(refs), record["image_id"]
        for s in record["subjects"]:
            # A rejected reference only where no clean one of its category was left for this scene.
            if not s["reference_clean"]:
                left = [e for e in pool["categories"][str(s["category_id"])]
                        if e["clean"] and e["image_id"] != record["image_id"] and e["ann_id"] not in refs]  # fmt: skip
                assert not left, (record["image_id"], s["category"])
            assert pooled[s["reference_id"]]["clean"] == s["reference_clean"]


def _entry(ann_id: int, image_id: int, clean: bool = True, category_id: int = 1) -> PoolEntry:
    return PoolEntry(ann_id, image_id, category_id, (0.0, 0.0, 10.0, 10.0), 100, () if clean else ("small",), 1.0)


def test_plan_scene_draws_without_replacement_clean_first(tiny_coco: Path) -> None:
    coco = load_instances(tiny_coco / "annotations" / "instances_train2017.json")
    scene = 1
    rows = np.flatnonzero((coco.image_ids == scene) & ~coco.iscrowd)
    cats = sorted({int(c) for c in coco.category_ids[rows]})
    # Per category: two clean entries from other photos, one from the scene's own photo, one rejected.
    pools = {
        c: [_entry(c * 10 + 1, 7, category_id=c), _entry(c * 10 + 2, 8, category_id=c),
            _entry(c * 10 + 3, scene, category_id=c), _entry(c * 10 + 4, 9, clean=False, category_id=c)]
        for c in cats
    }  # fmt: skip
    picks = set()
    for seed in range(12):
        record, reason = plan_scene(coco, rows, pools, {}, seed)
        assert reason == ""
        refs = [s["reference_id"] for s in record["subjects"]]
        assert all(r % 10 in (1, 2) for r in refs) and all(s["reference_clean"] for s in record["subjects"])
        picks.add(tuple(refs))
    assert len(picks) > 1  # the seed draws among the clean entries
    # Two dogs in one scene: the second gets the other clean entry, then (with one clean entry) the rejected one.
    two_dogs = np.concatenate([rows, rows[:1]])
    dog = int(coco.category_ids[rows[0]])
    record, _ = plan_scene(coco, two_dogs, pools, {}, 0)
    dogs = [s["reference_id"] for s in record["subjects"] if s["category_id"] == dog]
    assert sorted(dogs) == [dog * 10 + 1, dog * 10 + 2]
    pools[dog] = [e for e in pools[dog] if e.ann_id != dog * 10 + 2]
    record, _ = plan_scene(coco, two_dogs, pools, {}, 0)
    dogs = {s["reference_id"]: s["reference_clean"] for s in record["subjects"] if s["category_id"] == dog}
    assert dogs == {dog * 10 + 1: True, dog * 10 + 4: False}
    # Three dogs but two references outside the photo: the scene is skipped, never given a repeat.
    record, reason = plan_scene(coco, np.concatenate([two_dogs, rows[:1]]), pools, {}, 0)
    assert record is None and "3 subjects of category" in reason and "never gets the same reference twice" in reason


def test_plan_scene_spreads_fallbacks_over_the_least_rejected(tiny_coco: Path) -> None:
    coco = load_instances(tiny_coco / "annotations" / "instances_train2017.json")
    rows = np.flatnonzero((coco.image_ids == 1) & ~coco.iscrowd)
    worse = PoolEntry(4, 9, 0, (0.0, 0.0, 10.0, 10.0), 100, ("small", "occluded"), 9.0)
    pools = {
        int(c): [_entry(int(c) * 10 + 1, 7, clean=False, category_id=int(c)),
                 _entry(int(c) * 10 + 2, 8, clean=False, category_id=int(c)),
                 PoolEntry(int(c) * 10 + 3, 9, int(c), worse.bbox, 100, worse.causes, 9.0)]
        for c in coco.category_ids[rows]
    }  # fmt: skip
    picks = set()
    for seed in range(12):
        record, _ = plan_scene(coco, rows, pools, {}, seed)
        picks.update(s["reference_id"] % 10 for s in record["subjects"])
        assert not any(s["reference_clean"] for s in record["subjects"])
    assert picks == {1, 2}  # both single-cause fallbacks serve, the two-cause one never does


def test_same_seed_same_bytes(tiny_coco: Path, tiny_build: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=again, workers=2), progress=False)
    assert tree_bytes(again) == tree_bytes(tiny_build)  # also: worker count does not change the output
    other = tmp_path / "other"
    build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=other, seed=1), progress=False)
    # Every tiny candidate is rejected by the rule; a scene draws among the fallbacks with the fewest causes with its
    # seed, so another seed keeps the subjects and changes some of their references.
    records, other_records = read_jsonl(tiny_build / "manifest.jsonl"), read_jsonl(other / "manifest.jsonl")

    def without_references(record: dict) -> list[dict]:
        return [{k: v for k, v in s.items() if not k.startswith("reference")} for s in record["subjects"]]

    assert [without_references(r) for r in records] == [without_references(r) for r in other_records]
    assert [r["subjects"] for r in records] != [r["subjects"] for r in other_records]


def test_resume_after_interruption_gives_identical_bytes(mini_train_build: Path, tmp_path: Path) -> None:
    full = tree_bytes(mini_train_build)
    config = json.loads((mini_train_build / "config.json").read_text())
    out = tmp_path / "resumed"
    shutil.copytree(mini_train_build, out)
    # What a kill leaves: a prefix of the manifest plus half a line, layouts of later scenes already written or not,
    # no stats.json; and, for the pool stage, a missing pool.json with part of the pool files.
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    (out / "manifest.jsonl").write_bytes(b"".join(lines[:10]) + lines[10][:37])
    for record in [json.loads(line) for line in lines[10:]][::2]:
        (out / record["layout_map"]).unlink()
    (out / "stats.json").unlink()
    (out / "pool.json").unlink()
    for path in sorted((out / "pool").rglob("*.png"))[::3]:
        path.unlink()
    build_msi(BuildConfig(coco_root=Path(config["coco_root"]), split="train2017", out=out), progress=False)
    assert tree_bytes(out) == full


def test_changed_settings_are_refused(tiny_coco: Path, tiny_build: Path) -> None:
    with pytest.raises(ValueError, match=r"beta: 0.015 -> 0.02"):
        build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=tiny_build, beta=0.02), progress=False)


def test_scene_without_an_outside_reference_is_reported(tiny, tmp_path: Path) -> None:
    root = tiny.make(tmp_path / "coco")
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    # Make the kite of image 1 the only kite anywhere: its scene has no reference outside itself.
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 3 or a["image_id"] == 1]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    build_msi(BuildConfig(coco_root=root, split="train2017", out=tmp_path / "out"), progress=False)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    skipped = {s["image_id"]: s["reason"] for s in stats["skipped"]}
    assert "no reference for category 'kite' outside this image (pool of 1)" in skipped[1]
    assert stats["scenes_kept"] == 1 and stats["scenes_written"] == 0
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == ""


def test_category_prompt() -> None:
    assert category_prompt(["person", "dog", "person"]) == "a photo of two people and a dog"
    assert category_prompt(["apple"]) == "a photo of an apple"
    assert category_prompt(["bus"] * 3 + ["teddy bear"]) == "a photo of three buses and a teddy bear"
