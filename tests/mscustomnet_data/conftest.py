"""A hand-written tiny COCO split with known geometry and colours, and shared MSI builds.

Every photo is 100 x 80 (beta * area = 120 px). Each category is painted in its own pure colour, and each instance's
segmentation is exactly its visible pixels, so a reference cut from any photo holds only its category's colour.

  dog  (red)     50x50 box at (5, 5) minus the cat square inside it: 4 band polygons + 1 duplicated band, 2100 px
  cat  (green)   20x20 square inside the dog box, 400 px; its annotation id is lower than the dog's
  kite (blue)    30x20 at (60, 5), 600 px
  bus  (yellow)  35x35 at (60, 30), 1225 px
  cup  (magenta) at (5, 58): 12x12 = 144 px (salient), or 10x12 = 120 px = beta exactly (not salient)
  person (cyan)  crowd band y 74..80, uncompressed RLE, 600 px: never salient

  image 1: cat at (30, 30), cup 144 polygon, crowd            -> 5 salient, kept, captioned
  image 2: cat at (30, 30), cup 120 polygon, crowd            -> 4 salient, dropped (crowd and beta are not enough)
  image 3: cat at (30, 30), cup 144 as compressed RLE         -> kept, captioned
  image 4: cat at (10, 10), cup 144 polygon                   -> kept, no caption (prompt from categories)
  image 5: like 1, photo file missing                         -> kept by the filter, skipped by the builder
  image 6: like 1, photo file truncated (corrupt)             -> kept by the filter, skipped by the builder
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mscustomnet.data.build import BuildConfig, build_msi

WIDTH, HEIGHT = 100, 80
BACKGROUND = (128, 128, 128)
CATEGORIES = {1: ("dog", (255, 0, 0)), 2: ("cat", (0, 255, 0)), 3: ("kite", (0, 0, 255)),
              4: ("bus", (255, 255, 0)), 5: ("cup", (255, 0, 255)), 6: ("person", (0, 255, 255))}  # fmt: skip
DOG_BOX = (5, 5, 55, 55)
KITE_BOX = (60, 5, 90, 25)
BUS_BOX = (60, 30, 95, 65)
CROWD_BOX = (0, 74, 100, 80)
CAT_AT = {1: (30, 30), 2: (30, 30), 3: (30, 30), 4: (10, 10), 5: (30, 30), 6: (30, 30)}
CUP_SIZE = {1: (12, 12), 2: (10, 12), 3: (12, 12), 4: (12, 12), 5: (12, 12), 6: (12, 12)}
KEPT_BY_FILTER = [1, 3, 4, 5, 6]
WRITTEN = [1, 3, 4]


def rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def frame_polygons(outer: tuple[int, ...], inner: tuple[int, ...]) -> list[list[float]]:
    """Outer box minus inner box as 4 bands, plus the top band once more (the mask is their union)."""
    ox0, oy0, ox1, oy1 = outer
    ix0, iy0, ix1, iy1 = inner
    top = rect_polygon(ox0, oy0, ox1, iy0)
    return [top, rect_polygon(ox0, iy1, ox1, oy1), rect_polygon(ox0, iy0, ix0, iy1), rect_polygon(ix1, iy0, ox1, iy1),
            list(top)]  # fmt: skip


def _uncompressed_rle(box: tuple[int, ...]) -> dict:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    flat = mask.flatten(order="F")  # COCO RLE runs go down columns
    counts, current, run = [], 0, 0
    for value in flat.tolist():
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": [HEIGHT, WIDTH]}


def _compressed_rle(box: tuple[int, ...]) -> dict:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"counts": rle["counts"].decode("ascii"), "size": [HEIGHT, WIDTH]}


def scene_boxes(image_id: int) -> dict[str, tuple[int, int, int, int]]:
    cx, cy = CAT_AT[image_id]
    cw, ch = CUP_SIZE[image_id]
    return {"dog": DOG_BOX, "cat": (cx, cy, cx + 20, cy + 20), "kite": KITE_BOX, "bus": BUS_BOX,
            "cup": (5, 58, 5 + cw, 58 + ch), "person": CROWD_BOX}  # fmt: skip


def make_tiny_coco(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images, annotations = [], []
    names = {name: cid for cid, (name, _) in CATEGORIES.items()}
    for image_id in range(1, 7):
        boxes = scene_boxes(image_id)
        file_name = f"{image_id:012d}.png"
        images.append({"id": image_id, "file_name": file_name, "width": WIDTH, "height": HEIGHT})
        photo = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        photo[:] = BACKGROUND
        for name in ("dog", "cat", "kite", "bus", "cup", "person"):  # cat drawn over the dog
            x0, y0, x1, y1 = boxes[name]
            photo[y0:y1, x0:x1] = CATEGORIES[names[name]][1]
        segmentations = {
            "dog": frame_polygons(boxes["dog"], boxes["cat"]),
            "cat": [rect_polygon(*boxes["cat"])],
            "kite": [rect_polygon(*boxes["kite"])],
            "bus": [rect_polygon(*boxes["bus"])],
            "cup": _compressed_rle(boxes["cup"]) if image_id == 3 else [rect_polygon(*boxes["cup"])],
            "person": _uncompressed_rle(boxes["person"]),
        }
        # Annotation ids: the cat's is the lowest, so paint order cannot come from ids.
        for offset, name in enumerate(("cat", "dog", "kite", "bus", "cup", "person")):
            x0, y0, x1, y1 = boxes[name]
            annotations.append({
                "id": image_id * 100 + offset, "image_id": image_id, "category_id": names[name],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                "iscrowd": int(name == "person"), "segmentation": segmentations[name],
            })  # fmt: skip
        path = root / "train2017" / file_name
        if image_id == 5:
            continue  # missing photo
        Image.fromarray(photo).save(path)
        if image_id == 6:
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated photo
    categories = [{"id": cid, "name": name, "supercategory": "thing"} for cid, (name, _) in CATEGORIES.items()]
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    captions = [{"id": 1, "image_id": 1, "caption": "A dog, a cat and a kite near a bus."},
                {"id": 2, "image_id": 1, "caption": "Animals by a bus with a cup."},
                {"id": 3, "image_id": 3, "caption": "A cat sits on a dog."}]  # fmt: skip
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({"annotations": captions}))
    return root


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


@pytest.fixture(scope="session")
def tiny_build(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_msi")
    build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=out), progress=False)
    return out


@pytest.fixture(scope="session")
def mini_train_build(coco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MSI build of the real coco2017-mini train split at the paper's defaults."""
    out = tmp_path_factory.mktemp("mini_msi_train")
    build_msi(BuildConfig(coco_root=coco_root, split="train2017", out=out, workers=2), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """The tiny split's geometry and colours, for assertions."""
    return SimpleNamespace(
        width=WIDTH, height=HEIGHT, categories=CATEGORIES, colors={n: c for n, c in CATEGORIES.values()},
        scene_boxes=scene_boxes, kept_by_filter=KEPT_BY_FILTER, written=WRITTEN, make=make_tiny_coco,
    )  # fmt: skip
