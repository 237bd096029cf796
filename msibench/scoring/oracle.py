"""Oracle detectors: stand-ins that "detect" a layout known in advance instead of looking at the pixels.

A generated image is recognised by a hash of its pixels (:func:`image_key`); :func:`run_images` maps the images of
runs' ok records to anything derived from their record (usually the manifest task, :func:`task_images`), and
:func:`oracle_detector` turns that mapping plus a ``layout`` callback (what was drawn where, and what of it is found)
into a detector the :class:`~msibench.scoring.scorer.Scorer` accepts. Used by the tests and benchmarks to score runs
without a real detector (a perfect one, or one with chosen misses and false detections); callers keep their own
variations in the callback. Nothing heavy is imported here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from msibench.scoring.detect import CallableDetector, Detections

if TYPE_CHECKING:
    from PIL import Image

    from msibench.bench.manifest import Manifest, Task

T = TypeVar("T")


def image_key(image: Image.Image) -> str:
    """The sha256 of an image's RGB pixels: the same for a generated image and its saved (lossless) file."""
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def run_images(run_dirs: Iterable[str | Path], value: Callable[[dict[str, Any]], T]) -> dict[str, T]:
    """{image key: ``value(record)``} for every ok generation record of the runs."""
    from PIL import Image

    from msibench.records import read_records

    out: dict[str, T] = {}
    for run_dir in map(Path, run_dirs):
        for r in read_records(run_dir):
            if r["status"] == "ok":
                with Image.open(run_dir / r["image"]) as im:
                    out[image_key(im)] = value(r)
    return out


def task_images(run_dirs: Iterable[str | Path], manifest: Manifest) -> dict[str, Task]:
    """{image key: the manifest task it was generated for} for every ok generation record of the runs."""
    return run_images(run_dirs, lambda r: manifest.by_id[r["task_id"]])


@dataclass(frozen=True)
class Drawn:
    """One object of a known layout: a normalised (x0, y0, x1, y1) box, its COCO id, its drawing order ``z`` (higher
    is in front) and the detection score; ``found=False`` draws it (it hides what is behind it in the masks) but
    leaves it out of the detections."""

    box: Sequence[float]
    category_id: int
    z: float = -1
    score: float | None = None
    found: bool = True


def task_layout(task: Task, *, invert: bool = False) -> list[Drawn]:
    """The task's subjects as drawn: its boxes, categories and z order (reversed with ``invert``)."""
    return [Drawn(s.box, s.category_id, -s.z if invert else s.z) for s in task.subjects]


def box_masks(drawn: Sequence[Drawn], size: tuple[int, int], *, layered: bool = True) -> list[np.ndarray]:
    """(H, W) masks of the boxes in a (width, height) image: the visible part of each when they are drawn back to
    front in z order (``layered``), else each whole box."""
    w, h = size
    masks = [np.zeros((h, w), dtype=bool) for _ in drawn]
    order = sorted(range(len(drawn)), key=lambda i: drawn[i].z) if layered else range(len(drawn))
    for i in order:  # back to front: each later box hides the earlier ones
        x0, y0, x1, y1 = drawn[i].box
        region = np.zeros((h, w), dtype=bool)
        region[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = True
        if layered:
            for m in masks:
                m &= ~region
        masks[i] = region
    return masks


def oracle_detector(
    by_image: Mapping[str, T],
    layout: Callable[[T], Sequence[Drawn]] = task_layout,
    *,
    name: str,
    masks: Literal["layered", "boxes"] | None = "layered",
) -> CallableDetector:
    """A detector that returns, for each image, the found objects of ``layout(by_image[image_key(image)])``: their
    boxes, categories and scores (1 where not given), with ``masks`` of every drawn object ("layered": visible parts,
    "boxes": whole boxes; None: no masks)."""

    def detect(images: Sequence[Image.Image]) -> list[Detections]:
        out = []
        for image in images:
            drawn = list(layout(by_image[image_key(image)]))
            found = [d for d in drawn if d.found]
            scores = [1.0 if d.score is None else d.score for d in found]
            kept = None
            if masks is not None:
                every = box_masks(drawn, image.size, layered=masks == "layered")
                kept = [m for m, d in zip(every, drawn, strict=True) if d.found]
            boxes, cats = [list(d.box) for d in found], [d.category_id for d in found]
            out.append(Detections.build(boxes, cats, image_size=image.size, scores=scores, masks=kept))
        return out

    return CallableDetector(detect, name=name, has_masks=masks is not None)
