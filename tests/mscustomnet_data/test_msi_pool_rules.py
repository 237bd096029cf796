"""The MSI pool's own rules on top of the shared reference rule (issue 22): a fallback that spans the frame never
serves (train 390240, a cake wrapper labelled "dining table", and 412563, a band of tablecloth), and a blurred
reference is not clean (train 1710395, a defocused 82x93 background player)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from msibench.bench import quality
from msibench.coco import decode_mask, load_split

CAKE_WRAPPER_TABLE = 390240
TABLECLOTH_BAND = 412563
BLURRED_PERSON = 1710395


def _pool_entries(build: Path) -> list[dict]:
    pool = json.loads((build / "pool.json").read_text())
    return [e for entries in pool["categories"].values() for e in entries]


def _annotation(coco, ann_id: int) -> tuple[dict, dict]:
    ann = next(a for a in coco.annotations if a["id"] == ann_id)
    return ann, coco.images[ann["image_id"]]


def test_a_fallback_spanning_the_frame_never_serves(mini_train_build: Path, coco_root: Path) -> None:
    coco = load_split(coco_root, "train2017")
    for ann_id in (CAKE_WRAPPER_TABLE, TABLECLOTH_BAND):
        ann, image = _annotation(coco, ann_id)
        assert quality.spans_frame(quality.pixel_box(ann["bbox"], image["width"], image["height"]), image["width"],
                                   image["height"])  # fmt: skip

    entries = _pool_entries(mini_train_build)
    assert not {CAKE_WRAPPER_TABLE, TABLECLOTH_BAND} & {e["ann_id"] for e in entries}
    records = [json.loads(line) for line in (mini_train_build / "manifest.jsonl").read_text().splitlines()]
    used = {s["reference_id"] for r in records for s in r["subjects"]}
    assert not {CAKE_WRAPPER_TABLE, TABLECLOTH_BAND} & used
    stats = json.loads((mini_train_build / "stats.json").read_text())
    assert stats["per_category"]["dining table"]["rejected_by_cause"]["spans_frame"] >= 1
    # No truncated pool entry spans the frame (recomputed from the annotations), and some truncated ones serve: the
    # rule removes the spanning ones only.
    truncated = [e for e in entries if "truncated" in e["causes"]]
    assert truncated
    for entry in truncated:
        ann, image = _annotation(coco, entry["ann_id"])
        box = quality.pixel_box(ann["bbox"], image["width"], image["height"])
        assert not quality.spans_frame(box, image["width"], image["height"])


def _sharpness(coco, coco_root: Path, ann_id: int, mask: np.ndarray | None = None) -> float:
    ann, image = _annotation(coco, ann_id)
    x0, y0, x1, y1 = quality.pixel_box(ann["bbox"], image["width"], image["height"])
    with Image.open(coco_root / "train2017" / image["file_name"]) as photo:
        grey = np.asarray(photo.convert("L"))[y0:y1, x0:x1]
    if mask is None:
        mask = decode_mask(ann["segmentation"], image["height"], image["width"]).astype(bool)[y0:y1, x0:x1]
    return quality.sharpness(grey, mask)


def test_a_blurred_reference_is_not_clean(mini_train_build: Path, coco_root: Path) -> None:
    coco = load_split(coco_root, "train2017")
    ann, _ = _annotation(coco, BLURRED_PERSON)
    assert round(ann["bbox"][2]) == 83 and round(ann["bbox"][3]) == 94  # the 82.6 x 93.8 person of the issue
    assert _sharpness(coco, coco_root, BLURRED_PERSON) < quality.MIN_SHARPNESS
    entries = _pool_entries(mini_train_build)
    assert all(not e["clean"] for e in entries if e["ann_id"] == BLURRED_PERSON)
    stats = json.loads((mini_train_build / "stats.json").read_text())
    assert stats["per_category"]["person"]["rejected_by_cause"]["blurred"] >= 1
    # Every clean pool reference is sharp enough, measured on its saved (cleaned) mask; blurred ones were found.
    clean = [e for e in entries if e["clean"]]
    assert len(clean) > 100
    for entry in clean:
        mask = np.asarray(Image.open(mini_train_build / entry["mask_file"])) > 0
        assert _sharpness(coco, coco_root, entry["ann_id"], mask) >= quality.MIN_SHARPNESS, entry["ann_id"]
    assert any(e["causes"] == [quality.BLURRED_CAUSE] for e in entries)


def test_sharpness_and_frame_measures() -> None:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, size=(180, 120)).astype(np.uint8)
    texture = ndimage.zoom(texture, 2, order=0)  # 4 px blocks: detail that survives scaling to 224 px
    inside = np.ones(texture.shape, dtype=bool)
    sharp = quality.sharpness(texture, inside)
    blurred = quality.sharpness(ndimage.gaussian_filter(texture.astype(float), 4).astype(np.uint8), inside)
    assert sharp > 10 * quality.MIN_SHARPNESS and blurred < quality.MIN_SHARPNESS
    assert quality.sharpness(texture, np.zeros_like(inside)) == 0.0
    # spans the frame: the box reaches two opposite edges (within the border margin); a corner does not
    assert quality.spans_frame((3, 40, 196, 70), 200, 100) and quality.spans_frame((50, 0, 60, 100), 200, 100)
    assert not quality.spans_frame((0, 0, 80, 50), 200, 100) and not quality.spans_frame((9, 40, 200, 70), 200, 100)
