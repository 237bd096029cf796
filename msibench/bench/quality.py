"""Reference quality: which COCO instances can serve as a reference image, judged from the annotations alone.

One rule, used by ``msibench bench build`` (MSIBench references) and ``mscustomnet data build-msi`` (the MSI
reference pools). It lives here, in the lower layer, so that mscustomnet imports it and msibench never imports
mscustomnet. A reference is an instance's box crop with everything outside its mask set to white; the model is then
asked to preserve that object's identity, so the crop must show one whole object and nothing else.

For one instance ``i`` of a photo with mask ``m_i`` and integer pixel box ``B_i`` (floor / ceil of the COCO box):

- **truncated**: within :data:`BORDER_MARGIN_PX` of one image edge, the mask runs along more than
  :data:`MAX_BORDER_RUN` of the box's side parallel to that edge (the object continues outside the photo).
- **small**: the box's short side is below :data:`MIN_SIDE_PX`.
- **containment**: another instance ``j`` is *contained* when at least :data:`CONTAINED_OVERLAP` of ``m_j`` lies
  inside ``m_i`` (a dining table whose mask runs under the bottles and plates on it). When the contained pixels are
  at most :data:`MAX_CONTAINED_FRACTION` of ``m_i`` they are subtracted from the reference mask (a driver seen
  through a car window becomes white); above it the instance is a **container** and rejected.
- **occlusion**: the fraction of ``B_i`` covered by the masks of other instances (crowd regions included) that
  touch ``m_i`` (come within :data:`OCCLUDER_CONTACT_PX`), outside ``i``'s own (cleaned) mask. Only touching
  instances count: one that does not meet the mask cannot hide part of it, it merely shares the box's corner.
  Above :data:`MAX_OCCLUSION` the instance is **occluded**.
- **fragment**: the cleaned mask fills less than :data:`MIN_FILL` of its box, or its largest 8-connected part holds
  less than :data:`MIN_MAIN_PART` of it (an object cut in pieces by something in front of it).
- **sliver**: the mask is nowhere thicker (twice the largest distance to its outline) than :data:`MIN_THICKNESS_PX`,
  or than :data:`MIN_THICKNESS_RATIO` of the box's long side.
- **empty**: the mask has no pixel. Crowd annotations are never assessed (they are no single object).

An instance without any of these causes is *clean*. Clean candidates are ranked by ``score`` = sqrt(cleaned mask
area) x (1 - occlusion): the pixels of identity evidence a reference carries, discounted by how much of its box
others cover. The rule reads annotations only: an occluder COCO does not annotate (a fence, a tree) is invisible to
it, which is why MSIBench additionally applies a hand review (``msibench/data/reference_review.json``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bump when any definition or threshold below changes: MSIBench manifests record it (build.reference_rule) and an MSI
# build folder's settings include it, so a resumed build refuses to mix two rules.
QUALITY_VERSION = "1"

# Truncation by the frame. COCO polygons of objects cut by the frame often stop a few pixels short of it
# (hand-checked on val2017: annotations 450473 and 491422, people cut by the bottom edge, end 4.6 and 5.0 px above
# it), so the border band is 8 px wide. An object whose mask merely reaches into that band at one point (a foot, a
# wheel, the corner of a TV) is whole; one whose mask runs along the band for more than a quarter of its box's side
# was cut by the frame (on the slice, cut objects run along 0.49-0.99 of the side, whole ones near the border 0-0.28).
BORDER_MARGIN_PX = 8
MAX_BORDER_RUN = 0.25
# References are scaled to 224 px (DINO, CLIP) and 256 px (the model); a box whose short side is below 64 px is
# magnified at least 3.5x along it and reaches the encoders as blur.
MIN_SIDE_PX = 64
# Another instance whose mask lies at least half inside this one's mask sits on or in it (items on a table, food in
# a bowl, a driver behind a car's windscreen); less than half is ordinary overlap at a shared outline.
CONTAINED_OVERLAP = 0.5
# Contained objects covering at most 5 % of the mask are small details (a cup on a large table) that can be cut out
# without changing what the object looks like; more than that and the crop is a scene, not one object.
MAX_CONTAINED_FRACTION = 0.05
# Two masks within 3 px of each other touch (COCO polygons leave gaps of a pixel or two along shared outlines).
OCCLUDER_CONTACT_PX = 3
# An instance whose box is more than 20 % covered by the masks of instances touching it is usually partly hidden by
# them (hand-checked on the val2017 slice: below 0.2 the crops look whole, above 0.3 most are visibly cut).
MAX_OCCLUSION = 0.2
# A whole object fills at least a fifth of its box (elongated objects at a diagonal, forks and bicycles included,
# fill 0.2-0.4 on the slice); below that the mask is scattered pieces or a thin diagonal strip.
MIN_FILL = 0.2
# A whole object is (nearly) one connected region; when its largest part holds less than 90 % of the mask, something
# in front of it has cut it in pieces (half bicycles, two ends of a bench).
MIN_MAIN_PART = 0.9
# Thinner than 12 px everywhere (or than 6 % of its length: about 13 px once the long side is scaled to 224 px) the
# mask is an edge-on strip without texture for an image encoder to recognise.
MIN_THICKNESS_PX = 12.0
MIN_THICKNESS_RATIO = 0.06
# Thickness is measured on the mask subsampled to at most 256 px on its longer side (within the step, 1-3 px for
# COCO photos, of the full-resolution value): the distance transform dominated the rule's cost (the rule is 1.3x
# faster overall on the val2017 slice, with the same verdicts).
THICKNESS_GRID = 256

# Holes (issue 22): a contained instance that is not too large to keep (at most MAX_CONTAINED_FRACTION of the mask: a
# held phone, a cup on a table, a driver behind a windscreen) STAYS in the reference cut-out instead of being cut out
# of it. Subtracting it left a white hole shaped like the object (v2's baby 519484 with a phone-shaped hole in its
# hands), which reads as damage to the subject, while the small object it holds or carries reads as what it is and
# is part of how the subject looks in a photo. Above the fraction the instance is a container and rejected. So no
# reference cut-out has a hole where a held or overlapping instance was subtracted: the object stays, or the
# reference is rejected. The measurements above still remove the contained pixels (they count as covering the box),
# which is stricter than the kept cut-out. Applied by :func:`cutout_subtracted`.
CUTOUT_KEEPS_CONTAINED = True

CAUSES = ("empty", "truncated", "small", "container", "occluded", "fragment", "sliver")
# Causes that leave one recognisable object, only a worse view of it (cut by the frame, small, partly hidden). A
# training pool whose category lacks clean candidates may be filled with these, ranked after every clean one; a
# candidate that holds other objects, is in pieces, a sliver or empty never serves as a reference.
FALLBACK_CAUSES = ("truncated", "small", "occluded")


@dataclass(frozen=True)
class PhotoInstance:
    """One annotation of a photo, as the rule needs it."""

    ann_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # COCO x, y, w, h
    iscrowd: bool = False


@dataclass(frozen=True)
class ReferenceQuality:
    """The rule's measurements and verdict for one instance (all fractions in [0, 1], lengths in pixels)."""

    ann_id: int
    category_id: int
    box: tuple[int, int, int, int]  # integer pixel box x0, y0, x1, y1 (the reference crop)
    mask_area: int  # pixels of the cleaned mask (contained instances subtracted)
    fill: float
    occlusion: float
    occluders: tuple[int, ...]  # touching instances whose masks cover part of the box
    contained: tuple[int, ...]  # instances lying inside the mask (subtracted unless the instance is a container)
    contained_fraction: float
    truncated: bool
    min_side: int
    main_part: float
    thickness: float
    causes: tuple[str, ...]
    score: float

    @property
    def clean(self) -> bool:
        return not self.causes

    @property
    def usable_as_fallback(self) -> bool:
        """Clean, or rejected only for :data:`FALLBACK_CAUSES`."""
        return all(cause in FALLBACK_CAUSES for cause in self.causes)

    @property
    def subtracted(self) -> tuple[int, ...]:
        """Instances cut out of the reference mask (none when the instance is rejected as a container)."""
        return () if "container" in self.causes else self.contained

    def to_json(self) -> dict[str, Any]:
        return {
            "ann_id": self.ann_id,
            "category_id": self.category_id,
            "box": list(self.box),
            "mask_area": self.mask_area,
            "fill": round(self.fill, 4),
            "occlusion": round(self.occlusion, 4),
            "occluders": list(self.occluders),
            "contained": list(self.contained),
            "contained_fraction": round(self.contained_fraction, 4),
            "truncated": self.truncated,
            "min_side": self.min_side,
            "main_part": round(self.main_part, 4),
            "thickness": round(self.thickness, 2),
            "causes": list(self.causes),
            "score": round(self.score, 4),
        }


def pixel_box(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel box (x0, y0, x1, y1) covering a COCO [x, y, w, h] box, clipped to the image, never empty."""
    x, y, w, h = (float(v) for v in bbox)
    x0 = min(max(math.floor(x), 0), width - 1)
    y0 = min(max(math.floor(y), 0), height - 1)
    x1 = min(max(math.ceil(x + w), x0 + 1), width)
    y1 = min(max(math.ceil(y + h), y0 + 1), height)
    return x0, y0, x1, y1


def border_run(mask: np.ndarray, box: tuple[int, int, int, int], margin: int = BORDER_MARGIN_PX) -> float:
    """The largest fraction, over the four image edges, of the box side along which the mask lies within ``margin``
    px of that edge."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    m = margin
    return float(
        max(
            mask[:m].any(axis=0).sum() / width,
            mask[-m:].any(axis=0).sum() / width,
            mask[:, :m].any(axis=1).sum() / height,
            mask[:, -m:].any(axis=1).sum() / height,
        )
    )


def assess_photo(
    instances: Sequence[PhotoInstance], masks: Sequence[np.ndarray | None], width: int, height: int
) -> dict[int, ReferenceQuality]:
    """The verdict of every non-crowd instance of one photo, from all of its annotations (crowd ones included, as
    occluders). ``masks[i]`` is the boolean ``height x width`` mask of ``instances[i]`` (None or all-False when
    empty)."""
    if len(instances) != len(masks):
        raise ValueError(f"{len(instances)} instances but {len(masks)} masks")
    full = [None if m is None else np.asarray(m, dtype=bool) for m in masks]
    for inst, m in zip(instances, full, strict=True):
        if m is not None and m.shape != (height, width):
            raise ValueError(f"annotation {inst.ann_id}: mask shape {m.shape} is not the image's ({height}, {width})")
    areas = [0 if m is None else int(m.sum()) for m in full]
    # Bounding boxes of the masks themselves, for cheap overlap tests.
    extents = [_extent(m) if a else None for m, a in zip(full, areas, strict=True)]
    out = {}
    for i, inst in enumerate(instances):
        if inst.iscrowd:
            continue
        out[inst.ann_id] = _assess(i, instances, full, areas, extents, width, height)
    return out


def assess_annotations(
    annotations: Iterable[dict[str, Any]],
    width: int,
    height: int,
    decode: Callable[[Any, int, int], np.ndarray],
) -> dict[int, ReferenceQuality]:
    """:func:`assess_photo` over raw COCO annotation dicts of one photo, decoded with ``decode(seg, h, w)``."""
    annotations = sorted(annotations, key=lambda a: a["id"])
    instances = [
        PhotoInstance(int(a["id"]), int(a["category_id"]), tuple(float(v) for v in a["bbox"]), bool(a.get("iscrowd")))
        for a in annotations
    ]
    masks = [np.asarray(decode(a["segmentation"], height, width), dtype=bool) for a in annotations]
    return assess_photo(instances, masks, width, height)


def reference_mask(
    quality: ReferenceQuality, instances: Sequence[PhotoInstance], masks: Sequence[np.ndarray | None]
) -> np.ndarray:
    """The instance's full-size mask with the contained instances it keeps out (:attr:`ReferenceQuality.subtracted`)
    removed: the mask a reference is cut with."""
    index = {inst.ann_id: i for i, inst in enumerate(instances)}
    own = np.array(masks[index[quality.ann_id]], dtype=bool)
    for ann_id in quality.subtracted:
        other = masks[index[ann_id]]
        if other is not None:
            own &= ~np.asarray(other, dtype=bool)
    return own


def cutout_subtracted(quality: ReferenceQuality) -> tuple[int, ...]:
    """The instances removed from the reference cut-out's mask: none while :data:`CUTOUT_KEEPS_CONTAINED` (contained
    instances stay in the cut-out, which has no holes where they were), else :attr:`ReferenceQuality.subtracted`."""
    return () if CUTOUT_KEEPS_CONTAINED else quality.subtracted


def rank_key(quality: ReferenceQuality) -> tuple:
    """Sort key, best first: clean before rejected, rejected ones by fewer causes, then higher score, then id."""
    return (len(quality.causes), -quality.score, quality.ann_id)


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _overlaps(a: tuple[int, int, int, int] | None, b: tuple[int, int, int, int]) -> bool:
    return a is not None and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _thickness(mask: np.ndarray) -> float:
    """Twice the largest Euclidean distance from a mask pixel to the outside: the diameter of the thickest disk it
    holds. Measured on the mask subsampled so its longer side is at most :data:`THICKNESS_GRID` px (exact for smaller
    masks, within the subsampling step otherwise): the distance transform dominates the rule's cost."""
    from scipy import ndimage

    step = max(1, math.ceil(max(mask.shape) / THICKNESS_GRID))
    return 2.0 * step * float(ndimage.distance_transform_edt(np.pad(mask[::step, ::step], 1)).max())


def _assess(i, instances, masks, areas, extents, width, height) -> ReferenceQuality:  # noqa: PLR0913
    from scipy import ndimage

    inst = instances[i]
    box = pixel_box(inst.bbox, width, height)
    x0, y0, x1, y1 = box
    min_side = min(x1 - x0, y1 - y0)
    truncated = bool(areas[i] > 0 and border_run(masks[i], box) > MAX_BORDER_RUN)
    causes = []
    if truncated:
        causes.append("truncated")
    if min_side < MIN_SIDE_PX:
        causes.append("small")
    if areas[i] == 0:
        return ReferenceQuality(inst.ann_id, inst.category_id, box, 0, 0.0, 0.0, (), (), 0.0, truncated, min_side,
                                0.0, 0.0, ("empty", *causes), 0.0)  # fmt: skip

    # Work in a window around the mask and the box, wide enough to see touching neighbours.
    mx0, my0, mx1, my1 = extents[i]
    c = OCCLUDER_CONTACT_PX
    wx0, wy0 = max(min(mx0, x0) - c, 0), max(min(my0, y0) - c, 0)
    wx1, wy1 = min(max(mx1, x1) + c, width), min(max(my1, y1) + c, height)
    window = (slice(wy0, wy1), slice(wx0, wx1))
    own = masks[i][window]
    in_box = np.zeros_like(own)
    in_box[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = True
    near = ndimage.binary_dilation(own, structure=np.ones((3, 3), bool), iterations=c)
    win = (wx0, wy0, wx1, wy1)

    contained, touching = [], []
    contained_px = np.zeros_like(own)
    covered = np.zeros_like(own)
    for j, other in enumerate(instances):
        if j == i or areas[j] == 0 or not _overlaps(extents[j], win):
            continue
        m = masks[j][window]
        if not other.iscrowd and int((m & own).sum()) >= CONTAINED_OVERLAP * areas[j]:
            contained.append(other.ann_id)
            contained_px |= m & own
        if (m & near).any():
            touching.append(other.ann_id)
            covered |= m
    contained_fraction = float(contained_px.sum()) / areas[i]
    container = contained_fraction > MAX_CONTAINED_FRACTION
    clean = own & ~contained_px if contained and not container else own
    area = int(clean.sum())
    box_area = (x1 - x0) * (y1 - y0)
    occlusion = float((covered & in_box & ~clean).sum()) / box_area
    fill = area / box_area
    if area:
        labels, n = ndimage.label(clean, structure=np.ones((3, 3), bool))
        main_part = float(np.bincount(labels.ravel())[1:].max()) / area if n else 0.0
        thickness = _thickness(clean)
    else:
        main_part, thickness = 0.0, 0.0
    if container:
        causes.append("container")
    if occlusion > MAX_OCCLUSION:
        causes.append("occluded")
    if fill < MIN_FILL or main_part < MIN_MAIN_PART:
        causes.append("fragment")
    if thickness < MIN_THICKNESS_PX or thickness < MIN_THICKNESS_RATIO * max(x1 - x0, y1 - y0):
        causes.append("sliver")
    return ReferenceQuality(
        ann_id=inst.ann_id,
        category_id=inst.category_id,
        box=box,
        mask_area=area,
        fill=fill,
        occlusion=occlusion,
        occluders=tuple(sorted(touching)),
        contained=tuple(sorted(contained)),
        contained_fraction=contained_fraction,
        truncated=truncated,
        min_side=min_side,
        main_part=main_part,
        thickness=thickness,
        causes=tuple(causes),
        score=math.sqrt(area) * (1.0 - occlusion),
    )


__all__ = [
    "BORDER_MARGIN_PX",
    "CAUSES",
    "CONTAINED_OVERLAP",
    "CUTOUT_KEEPS_CONTAINED",
    "FALLBACK_CAUSES",
    "MAX_BORDER_RUN",
    "MAX_CONTAINED_FRACTION",
    "MAX_OCCLUSION",
    "MIN_FILL",
    "MIN_MAIN_PART",
    "MIN_SIDE_PX",
    "MIN_THICKNESS_PX",
    "MIN_THICKNESS_RATIO",
    "OCCLUDER_CONTACT_PX",
    "QUALITY_VERSION",
    "PhotoInstance",
    "ReferenceQuality",
    "assess_annotations",
    "assess_photo",
    "border_run",
    "cutout_subtracted",
    "pixel_box",
    "rank_key",
    "reference_mask",
]


# ------------------------------------------------------------------------------------- MSI training-pool measures
# Used by ``mscustomnet data build-msi`` on top of the rule above (MSIBench pools are reviewed by eye instead). They
# are not part of QUALITY_VERSION: the MSI build's own format version covers them.

# A fallback (a candidate rejected only for a worse view of one object, FALLBACK_CAUSES) that the frame cuts never
# serves when its box also reaches two opposite edges of the photo (left and right, or top and bottom, within
# BORDER_MARGIN_PX): it spans the photo, so only a band of it is in view, its ends and its shape are not, and for the
# surfaces that do this (tables, beds, pizzas in close-up) the band is mostly what lies on them or around them. On the
# train slice: 390240, a "dining table" that is a cake's paper wrapper on a window sill (box 0-640 of 640 px wide,
# it served 10 of 24 scenes), and 412563, the band of tablecloth around a teddy bear and a cup (box 1-480 of 480).
SPANS_FRAME_CAUSE = "spans_frame"
# References reach the image encoder with their long side at 224 px (:data:`SHARPNESS_SIDE`). The variance of the
# Laplacian of the grey photo pixels inside the (3 px eroded) mask at that scale measures the detail an encoder gets:
# defocus, motion blur, magnification of a small crop and a near-black object all leave little. Below 15 a
# reference counts as blurred, not clean (a fallback at best). Hand-checked on the 336 clean pool references of the
# train and val slices: the 8 below 15 are the defocused 82x93 background player (train 1710395, 11.2), a blurred
# wine glass, a blurred broccoli, a hat and four near-black blobs (a car, a cup, a book, a chair); the next ones
# (16-19: a dark TV, a dark chair, a plain grey TV, a bidet) are sharp.
BLURRED_CAUSE = "blurred"
MIN_SHARPNESS = 15.0
SHARPNESS_SIDE = 224
SHARPNESS_ERODE_PX = 3


def spans_frame(box: tuple[int, int, int, int], width: int, height: int) -> bool:
    """The pixel ``box`` reaches two opposite edges of a ``width`` x ``height`` photo, within
    :data:`BORDER_MARGIN_PX` (see :data:`SPANS_FRAME_CAUSE`; the MSI pool applies it to truncated fallbacks)."""
    x0, y0, x1, y1 = box
    m = BORDER_MARGIN_PX
    return (x0 < m and x1 > width - m) or (y0 < m and y1 > height - m)


def sharpness(grey: np.ndarray, mask: np.ndarray) -> float:
    """Variance of the Laplacian of a reference's grey pixels (its box crop of the photo, any range of 0-255 values)
    inside its ``mask`` (same size), measured with the crop scaled so its long side is :data:`SHARPNESS_SIDE` and the
    mask eroded by :data:`SHARPNESS_ERODE_PX` (the outline against the white cut-out background is not detail).
    0 when the eroded mask holds fewer than 16 pixels."""
    from PIL import Image
    from scipy import ndimage

    h, w = mask.shape
    scale = SHARPNESS_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey_img = Image.fromarray(np.asarray(grey, dtype=np.uint8)).resize(size, Image.Resampling.BILINEAR)
    small = np.asarray(Image.fromarray(np.asarray(mask, bool)).resize(size, Image.Resampling.NEAREST))
    inner = ndimage.binary_erosion(small, iterations=SHARPNESS_ERODE_PX)
    if inner.sum() < 16:
        return 0.0
    return float(ndimage.laplace(np.asarray(grey_img, dtype=np.float64))[inner].var())
