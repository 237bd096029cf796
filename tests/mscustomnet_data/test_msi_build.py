"""The MSI builder: tuples, layout maps, reference pools, skipping, determinism and resume."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mscustomnet.data.build import BuildConfig, build_msi, category_prompt


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
    assert stats["per_category"]["dog"] == {"category_id": 1, "subjects": 3, "scenes": 3, "pool": 4,
                                            "pool_cut_by_border": 0}  # fmt: skip
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
    images = {im["id"]: im for im in json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())[
        "images"]}  # fmt: skip
    for entries in pool["categories"].values():
        assert 1 <= len(entries) <= 30
        assert len({e["image_id"] for e in entries}) == len(entries)  # one instance per photo
        keys = [(e["cut_by_border"], -e["mask_area"], e["ann_id"]) for e in entries]
        assert keys == sorted(keys)  # uncut first, then larger first
    person = pool["categories"]["1"][0]
    assert not person["cut_by_border"]
    x, y, w, h = person["bbox"]
    image = images[person["image_id"]]
    assert x > 2 and y > 2 and x + w < image["width"] - 2 and y + h < image["height"] - 2
    rgb = np.asarray(Image.open(mini_train_build / person["file"]))
    mask = np.asarray(Image.open(mini_train_build / person["mask_file"])) > 0
    assert rgb.shape[:2] == mask.shape == (int(np.ceil(y + h)) - int(y), int(np.ceil(x + w)) - int(x))
    assert mask.sum() == person["mask_area"]  # the whole instance mask lies in its box, at original size
    assert (rgb[~mask] == 255).all() and (rgb[mask] != 255).any()


def test_same_seed_same_bytes_other_seed_other_references(tiny_coco: Path, tiny_build: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=again, workers=2), progress=False)
    assert tree_bytes(again) == tree_bytes(tiny_build)  # also: worker count does not change the output
    other = tmp_path / "other"
    build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=other, seed=1), progress=False)
    refs = [[s["reference_id"] for s in r["subjects"]] for r in read_jsonl(tiny_build / "manifest.jsonl")]
    other_refs = [[s["reference_id"] for s in r["subjects"]] for r in read_jsonl(other / "manifest.jsonl")]
    assert refs != other_refs


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
