"""Reference crops and the layout map M_L (paper Eq. 4), shared by the builder and the training Dataset.

Pixel conventions:
- A reference is its instance's box crop, RGB with every pixel outside its mask set to white (255), saved with the
  mask (L mode, 0 or 255) at original size.
- The layout map is a black (zero) RGB canvas of the scene's size. Each reference is resized to its subject's box
  (bilinear; the mask bilinear then thresholded at half) and pasted through its mask, so only object pixels land on
  the canvas and the white reference background never does. References are pasted in the occlusion-prior order
  o_k: larger mask area first, smaller masks on top (ties: lower annotation id first). ``z_rank`` 0 is the back.
- Boxes are COCO ``[x, y, w, h]`` floats; a box covers the pixels from floor(x) to ceil(x + w) (exclusive).
- What the image encoder sees of a reference (:func:`reference_square`) is one function for training and inference:
  the object cropped to its mask's box, scaled with Lanczos so its long edge spans ``object_size`` and centred on a
  white square (its mask bilinear, thresholded at half, likewise on black).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

WHITE = 255


def pixel_box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
    """Integer pixel box covering a float xyxy box, at least one pixel wide and high (not clipped)."""
    px0, py0 = math.floor(x0), math.floor(y0)
    px1, py1 = max(px0 + 1, math.ceil(x1)), max(py0 + 1, math.ceil(y1))
    return px0, py0, px1, py1


def coco_pixel_box(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box of a COCO ``[x, y, w, h]`` box, clipped to a width x height image and never empty."""
    x, y, w, h = bbox
    px0, py0, px1, py1 = pixel_box(x, y, x + w, y + h)
    px0, py0 = min(max(px0, 0), width - 1), min(max(py0, 0), height - 1)
    return px0, py0, min(max(px1, px0 + 1), width), min(max(py1, py0 + 1), height)


def reference_crop(image: np.ndarray, mask: np.ndarray, bbox: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Box crop of an instance: (RGB uint8 with white outside the mask, mask uint8 0/255), at original size."""
    height, width = mask.shape
    x0, y0, x1, y1 = coco_pixel_box(bbox, width, height)
    crop_mask = mask[y0:y1, x0:x1]
    crop_rgb = np.where(crop_mask[..., None], image[y0:y1, x0:x1], np.uint8(WHITE)).astype(np.uint8)
    return crop_rgb, crop_mask.astype(np.uint8) * 255


def reference_square(
    rgb: np.ndarray, mask: np.ndarray | None, size: int, object_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A reference as the model's image encoder sees it, in training (``MSIDataset``) and at inference
    (``mscustomnet.model.pipeline.prepare_reference``) alike: everything outside ``mask`` white, the crop tightened to
    the mask's box, scaled (Lanczos) so its long edge is ``object_size`` (default ``size``) and centred on a white
    ``size`` square. Returns (RGB uint8 [size, size, 3], bool mask [size, size]: the mask scaled bilinearly,
    thresholded at half, on the same square)."""
    object_size = size if object_size is None else object_size
    if not 1 <= object_size <= size:
        raise ValueError(f"object_size must be in 1..{size}, got {object_size}")
    rgb = np.array(rgb, dtype=np.uint8)
    inside = np.ones(rgb.shape[:2], dtype=bool) if mask is None else np.asarray(mask) > 0
    if inside.shape != rgb.shape[:2]:
        raise ValueError(f"mask size {inside.shape[::-1]} differs from reference size {rgb.shape[1::-1]}")
    rgb[~inside] = WHITE
    ys, xs = np.nonzero(inside)
    if len(ys):
        rgb = rgb[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        inside = inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = rgb.shape[:2]
    scale = object_size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    obj = Image.fromarray(rgb).resize(new, Image.Resampling.LANCZOS)
    obj_mask = Image.fromarray(inside.astype(np.uint8) * 255).resize(new, Image.Resampling.BILINEAR)
    offset = ((size - new[0]) // 2, (size - new[1]) // 2)
    square = Image.new("RGB", (size, size), (WHITE, WHITE, WHITE))
    square.paste(obj, offset)
    square_mask = Image.new("L", (size, size), 0)
    square_mask.paste(obj_mask, offset)
    return np.asarray(square), np.asarray(square_mask) >= 128


def box_to_coco(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


@dataclass(frozen=True)
class Placement:
    """One reference to paste: its crop, its mask, and the float xyxy box it is stretched to on the canvas."""

    rgb: np.ndarray  # uint8 [h, w, 3], white outside the mask
    mask: np.ndarray  # uint8 or bool [h, w], nonzero inside
    box: tuple[float, float, float, float]  # canvas x0, y0, x1, y1; may reach outside the canvas


def resize_reference(rgb: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize a reference crop and its mask to ``size`` = (width, height): stretched to its subject's box, not fitted
    with its aspect ratio (docs/msi-and-model.md says why)."""
    rgb_img = Image.fromarray(np.ascontiguousarray(rgb))
    mask_img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    if rgb_img.size != size:
        rgb_img = rgb_img.resize(size, Image.Resampling.BILINEAR)
        mask_img = mask_img.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb_img), np.asarray(mask_img) >= 128


def compose_layout_map(width: int, height: int, placements: Sequence[Placement]) -> tuple[np.ndarray, np.ndarray]:
    """Paste placements, in the order given (back to front), on a zero canvas.

    Returns the layout map (uint8 [height, width, 3]) and the index map (int16 [height, width]: the index in
    ``placements`` of the reference visible at each pixel, -1 where the canvas is empty).
    """
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    index_map = np.full((height, width), -1, dtype=np.int16)
    for index, placement in enumerate(placements):
        bx0, by0, bx1, by1 = pixel_box(*placement.box)
        rgb, inside = resize_reference(placement.rgb, placement.mask, (bx1 - bx0, by1 - by0))
        cx0, cy0, cx1, cy1 = max(bx0, 0), max(by0, 0), min(bx1, width), min(by1, height)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        src = (slice(cy0 - by0, cy1 - by0), slice(cx0 - bx0, cx1 - bx0))
        keep = inside[src]
        canvas[cy0:cy1, cx0:cx1][keep] = rgb[src][keep]
        index_map[cy0:cy1, cx0:cx1][keep] = index
    return canvas, index_map


def paint_order(mask_areas: Sequence[int], ann_ids: Sequence[int]) -> list[int]:
    """Occlusion prior o_k: indices sorted by mask area descending (pasted first = back), ties by annotation id."""
    return sorted(range(len(mask_areas)), key=lambda i: (-int(mask_areas[i]), int(ann_ids[i])))
