"""COCO 2017 helpers shared by the benchmark builder and the scorers: categories, masks, annotations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The 80 COCO 2017 detection categories (id, name), as in instances_*2017.json; YOLO's COCO-80 class
# names are the same strings in the same order, so index i here is YOLO class i.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip
CATEGORY_NAME: dict[int, str] = dict(COCO_CATEGORIES)
CATEGORY_ID: dict[str, int] = {name: cid for cid, name in COCO_CATEGORIES}
# Contiguous index 0..79 (YOLO class index, one-hot position) of a COCO category id.
CATEGORY_INDEX: dict[int, int] = {cid: i for i, (cid, _) in enumerate(COCO_CATEGORIES)}


class CocoError(ValueError):
    """A COCO folder or annotation file that cannot be used; the message names the path."""


@dataclass(frozen=True)
class CocoSplit:
    root: Path
    split: str
    images: dict[int, dict[str, Any]]
    annotations: list[dict[str, Any]]
    captions: dict[int, list[str]]

    def image_path(self, image_id: int) -> Path:
        return self.root / self.split / self.images[image_id]["file_name"]


def load_split(root: str | Path, split: str = "val2017") -> CocoSplit:
    """Read ``annotations/instances_{split}.json`` (and captions when present) under a COCO root."""
    root = Path(root)
    inst_path = root / "annotations" / f"instances_{split}.json"
    if not inst_path.is_file():
        raise CocoError(f"{inst_path}: COCO instance annotations not found (is {root} a COCO 2017 root?)")
    try:
        data = json.loads(inst_path.read_text())
    except json.JSONDecodeError as err:
        raise CocoError(f"{inst_path}: not valid JSON: {err}") from err
    images = {im["id"]: im for im in data["images"]}
    captions: dict[int, list[str]] = {}
    cap_path = root / "annotations" / f"captions_{split}.json"
    if cap_path.is_file():
        caps = json.loads(cap_path.read_text())
        for ann in sorted(caps["annotations"], key=lambda a: a["id"]):
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    return CocoSplit(root=root, split=split, images=images, annotations=data["annotations"], captions=captions)


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """COCO polygons (merged into one mask), uncompressed RLE or compressed RLE -> compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            raise CocoError("empty polygon list")
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if isinstance(counts, str):
            segmentation = {"size": segmentation["size"], "counts": counts.encode("ascii")}
        return segmentation
    raise CocoError(f"unsupported segmentation of type {type(segmentation).__name__}")


def decode_mask(segmentation: Any, height: int, width: int):
    """Binary mask (H, W) uint8 of a COCO segmentation."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(segmentation_to_rle(segmentation, height, width))


def mask_area(segmentation: Any, height: int, width: int) -> float:
    from pycocotools import mask as mask_utils

    return float(mask_utils.area(segmentation_to_rle(segmentation, height, width)))
