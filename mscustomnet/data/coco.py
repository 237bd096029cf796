"""COCO annotation loading and the saliency filter of the MSI dataset (paper Sec. III-A, Eq. 1-2).

Mask area definition. An instance's area is the pixel count of its segmentation mask as rasterised by
pycocotools (``frPyObjects`` + ``merge`` + ``area``): the union of its polygons, or its RLE (compressed or the
uncompressed ``counts`` list that COCO uses for ``iscrowd=1``). This is the definition the MSI issue names. COCO's own
``area`` field is not used: for polygons it is a float polygon area that differs from the rasterised mask by up to a
few percent (and by thousands of pixels on overlapping multi-polygon instances), so filtering on it would change which
instances sit just above beta. Rasterising costs ~16 us per instance in pycocotools' C code, i.e. ~15 s for the
860k instances of train2017 on one core, and the work is split across ``workers`` processes;
``benchmarks/bench_msi_filter.py`` measures both definitions.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

log = logging.getLogger(__name__)

# Paper defaults (Sec. III-A): a scene needs at least ALPHA salient subjects, each covering more than BETA of the
# image.
ALPHA = 5
BETA = 0.015


def load_json(path: str | os.PathLike[str]) -> Any:
    """Load a JSON file, with orjson when it is installed (3-4x faster on the 450 MB train2017 file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        import orjson
    except ImportError:  # orjson is an optional speed-up; the stdlib parser gives the same objects
        orjson = None
    try:
        if orjson is not None:
            return orjson.loads(path.read_bytes())
        with path.open("rb") as f:
            return json.load(f)
    except ValueError as e:  # orjson.JSONDecodeError and json.JSONDecodeError both subclass ValueError
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def segmentation_to_rle(segmentation: Any, height: int, width: int, *, where: str = "") -> dict | None:
    """The pycocotools RLE of one COCO segmentation (polygon list, uncompressed or compressed RLE).

    Returns None for a polygon list with no polygon of at least 3 points (it encloses no pixel). Polygons shorter than
    3 points are dropped before ``frPyObjects``: pycocotools would read a 4-number first polygon as a bounding box.
    """
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) % 2:
                raise ValueError(f"{where}: segmentation polygon must be a flat list of x,y pairs")
            if len(polygon) >= 6:
                polygons.append(polygon)
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}: RLE size {size} does not match the image size [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            return {"size": size, "counts": counts.encode("ascii")}
        if isinstance(counts, bytes):
            return {"size": size, "counts": counts}
        raise ValueError(f"{where}: RLE counts must be a list or a string, got {type(counts).__name__}")
    raise ValueError(f"{where}: segmentation must be a polygon list or an RLE dict with 'counts' and 'size'")


def mask_area(segmentation: Any, height: int, width: int, *, where: str = "") -> int:
    """Pixel count of the rasterised mask (see the module docstring for why this and not COCO's ``area``)."""
    rle = segmentation_to_rle(segmentation, height, width, where=where)
    return 0 if rle is None else int(mask_utils.area(rle))


def decode_mask(segmentation: Any, height: int, width: int, *, where: str = "") -> np.ndarray:
    """Boolean H x W mask of one segmentation."""
    rle = segmentation_to_rle(segmentation, height, width, where=where)
    if rle is None:
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode(rle).astype(bool)


# Work shared with forked area workers: set just before the pool starts, so children read it without pickling.
_AREA_JOBS: Sequence[tuple[Any, int, int, int]] = ()
_AREA_SOURCE = ""


def _areas_of_range(bounds: tuple[int, int]) -> np.ndarray:
    start, stop = bounds
    out = np.empty(stop - start, dtype=np.int64)
    for i, (segmentation, height, width, ann_id) in enumerate(_AREA_JOBS[start:stop]):
        try:
            out[i] = mask_area(segmentation, height, width)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{_AREA_SOURCE}: annotation {ann_id}{e}") from None
    return out


def compute_mask_areas(jobs: Sequence[tuple[Any, int, int, int]], workers: int = 1, source: str = "") -> np.ndarray:
    """Mask areas of (segmentation, height, width, annotation id) jobs, split across ``workers`` forked processes.

    ``source`` (the annotation file) prefixes error messages, which also name the annotation id.
    """
    global _AREA_JOBS, _AREA_SOURCE
    n = len(jobs)
    _AREA_JOBS, _AREA_SOURCE = jobs, source
    try:
        if workers <= 1 or n < 20_000 or "fork" not in mp.get_all_start_methods():
            return _areas_of_range((0, n))
        # Several chunks per worker so a slow chunk (large crowd RLEs) does not leave a core idle.
        edges = np.linspace(0, n, workers * 8 + 1).astype(int).tolist()
        # Frozen objects are skipped by the children's garbage collector, which would otherwise write to (and so
        # copy) every page of the parsed annotations that the fork shares.
        gc.freeze()
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_areas_of_range, list(zip(edges[:-1], edges[1:], strict=True)))
        finally:
            gc.unfreeze()
        return np.concatenate(parts)
    finally:
        _AREA_JOBS, _AREA_SOURCE = (), ""


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class Instance:
    ann_id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # COCO x, y, w, h in pixels
    mask_area: int
    iscrowd: bool


@dataclass(frozen=True)
class CocoInstances:
    """Columnar view of an ``instances_*.json`` file: one array entry per annotation, masks' areas included.

    Columns rather than 860k objects keep the filter vectorised; ``instance(i)`` builds a record on demand.
    """

    source: Path
    images: dict[int, ImageInfo]
    categories: dict[int, str]
    ann_ids: np.ndarray  # int64 [N]
    image_ids: np.ndarray  # int64 [N]
    category_ids: np.ndarray  # int64 [N]
    bboxes: np.ndarray  # float64 [N, 4]
    iscrowd: np.ndarray  # bool [N]
    mask_areas: np.ndarray  # int64 [N]
    image_areas: np.ndarray  # int64 [N], height * width of the instance's image
    segmentations: list[Any]  # raw COCO segmentations; the builder drops them once the pools are cut

    def __len__(self) -> int:
        return int(self.ann_ids.shape[0])

    def instance(self, i: int) -> Instance:
        return Instance(
            ann_id=int(self.ann_ids[i]),
            image_id=int(self.image_ids[i]),
            category_id=int(self.category_ids[i]),
            bbox=tuple(float(v) for v in self.bboxes[i]),  # type: ignore[arg-type]
            mask_area=int(self.mask_areas[i]),
            iscrowd=bool(self.iscrowd[i]),
        )


def load_instances(path: str | os.PathLike[str], workers: int = 1) -> CocoInstances:
    """Read a COCO instances file and compute every annotation's mask area."""
    path = Path(path)
    data = load_json(path)
    for field in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(field), list):
            raise ValueError(f"{path}: missing list field '{field}'")
    images: dict[int, ImageInfo] = {}
    for entry in data["images"]:
        try:
            info = ImageInfo(int(entry["id"]), str(entry["file_name"]), int(entry["width"]), int(entry["height"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: image entry {entry.get('id', '?')!r} lacks a valid field ({e!r})") from e
        images[info.image_id] = info
    categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}

    annotations = data["annotations"]
    n = len(annotations)
    ann_ids = np.empty(n, dtype=np.int64)
    image_ids = np.empty(n, dtype=np.int64)
    category_ids = np.empty(n, dtype=np.int64)
    bboxes = np.empty((n, 4), dtype=np.float64)
    iscrowd = np.empty(n, dtype=bool)
    image_areas = np.empty(n, dtype=np.int64)
    jobs: list[tuple[Any, int, int, int]] = []
    for i, ann in enumerate(annotations):
        try:
            ann_id = int(ann["id"])
            image = images[int(ann["image_id"])]
            category_id = int(ann["category_id"])
            bbox = ann["bbox"]
            segmentation = ann["segmentation"]
        except KeyError as e:
            raise ValueError(f"{path}: annotation {ann.get('id', '?')!r} has a missing or unknown field {e}") from e
        if category_id not in categories:
            raise ValueError(f"{path}: annotation {ann_id} has unknown category_id {category_id}")
        if len(bbox) != 4:
            raise ValueError(f"{path}: annotation {ann_id} bbox must have 4 numbers, got {bbox!r}")
        ann_ids[i] = ann_id
        image_ids[i] = image.image_id
        category_ids[i] = category_id
        bboxes[i] = bbox
        iscrowd[i] = bool(ann.get("iscrowd", 0))
        image_areas[i] = image.width * image.height
        jobs.append((segmentation, image.height, image.width, ann_id))
    del data, annotations  # the segmentations stay referenced by ``jobs``; the rest of the parsed file is freed
    mask_areas = compute_mask_areas(jobs, workers=workers, source=str(path))
    return CocoInstances(
        source=path,
        images=images,
        categories=categories,
        ann_ids=ann_ids,
        image_ids=image_ids,
        category_ids=category_ids,
        bboxes=bboxes,
        iscrowd=iscrowd,
        mask_areas=mask_areas,
        image_areas=image_areas,
        segmentations=[job[0] for job in jobs],
    )


@dataclass(frozen=True)
class SalientScenes:
    """Result of the Eq. 1-2 filter: kept scenes and their salient subjects (annotation-row indices)."""

    alpha: int
    beta: float
    salient: np.ndarray  # bool [N]: non-crowd and mask area / image area > beta
    scenes: dict[int, np.ndarray]  # image id -> row indices of its salient instances, for kept scenes only

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.scenes)


def salient_mask(coco: CocoInstances, beta: float = BETA) -> np.ndarray:
    """Eq. 1: an instance is salient when its mask area over the image area exceeds beta; crowds never are."""
    return (~coco.iscrowd) & (coco.mask_areas.astype(np.float64) / coco.image_areas.astype(np.float64) > beta)


def filter_scenes(coco: CocoInstances, alpha: int = ALPHA, beta: float = BETA) -> SalientScenes:
    """Eq. 2: keep the images with at least ``alpha`` salient instances."""
    if alpha < 1:
        raise ValueError(f"alpha must be >= 1, got {alpha}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    salient = salient_mask(coco, beta)
    rows = np.flatnonzero(salient)
    order = np.lexsort((coco.ann_ids[rows], coco.image_ids[rows]))
    rows = rows[order]
    ids, starts, counts = np.unique(coco.image_ids[rows], return_index=True, return_counts=True)
    scenes = {
        int(image_id): rows[start : start + count]
        for image_id, start, count in zip(ids.tolist(), starts.tolist(), counts.tolist(), strict=True)
        if count >= alpha
    }
    return SalientScenes(alpha=alpha, beta=beta, salient=salient, scenes=scenes)


def load_captions(path: str | os.PathLike[str]) -> dict[int, list[str]]:
    """Image id -> its captions ordered by caption id. A missing file gives an empty mapping and a warning."""
    path = Path(path)
    if not path.is_file():
        log.warning("caption file %s not found: every prompt will be built from category names", path)
        return {}
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: missing list field 'annotations'")
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in data["annotations"]:
        try:
            by_image.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), str(ann["caption"]).strip()))
        except KeyError as e:
            raise ValueError(f"{path}: caption {ann.get('id', '?')!r} lacks field {e}") from e
    return {image_id: [c for _, c in sorted(caps)] for image_id, caps in by_image.items()}
