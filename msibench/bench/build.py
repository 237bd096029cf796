"""Build the MSIBench manifest deterministically from a COCO 2017 split.

Multi-subject track: for K = 2..5, ``per_k`` tasks each reusing the layout of a real scene with at least K
salient instances (mask area / image area > ``beta``, not crowd). The subjects are the scene's K largest salient
instances whose category has a reference in another image; boxes are normalized to a square canvas (the
scene letterboxed: scaled by 1 / max(W, H) and centred, so box aspect ratios are kept); z-order from the
occlusion prior (smaller mask area = nearer = higher z, drawn on top).

References: a different instance of the same category from another image, chosen for quality among the
category's best candidates (not crowd, not cut by the image border, largest mask first), with the seed.

Single-subject track: ``single_n`` tasks with one subject, going round the categories so that as many
categories as the data allows are covered before any repeats.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msibench.bench.manifest import MANIFEST_FORMAT
from msibench.bench.prompts import load_backgrounds, make_prompt
from msibench.coco import CATEGORY_NAME, CocoSplit, load_split, mask_area

logger = logging.getLogger(__name__)

MANIFEST_VERSION = "1"
BUILDER_VERSION = "1"


@dataclass(frozen=True)
class BuildParams:
    split: str = "val2017"
    seed: int = 0
    beta: float = 0.015
    subject_counts: tuple[int, ...] = (2, 3, 4, 5)
    per_k: int = 25
    single_n: int = 100
    # Candidates per category that a reference is drawn from (best first by quality).
    reference_pool: int = 5
    # A reference must be at least this many pixels wide and high.
    min_reference_side: int = 32
    # A box within this many pixels of the image edge counts as cut by the border.
    border_margin: float = 2.0


@dataclass(frozen=True)
class _Instance:
    ann_id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    segmentation: Any
    area: float
    area_ratio: float
    iscrowd: bool
    touches_border: bool


class BuildError(RuntimeError):
    pass


def build_manifest(coco_root: str | Path, params: BuildParams = BuildParams()) -> dict[str, Any]:
    """Return the manifest dict (write it with :func:`msibench.bench.manifest.dumps`)."""
    coco = load_split(coco_root, params.split)
    instances = _instances(coco, params)
    by_image: dict[int, list[_Instance]] = defaultdict(list)
    for inst in instances:
        by_image[inst.image_id].append(inst)
    salient = {
        image_id: sorted(
            (i for i in insts if not i.iscrowd and i.area_ratio > params.beta), key=lambda i: (-i.area, i.ann_id)
        )
        for image_id, insts in by_image.items()
    }
    candidates = _reference_candidates(instances, params)
    backgrounds = load_backgrounds()

    tasks: list[dict[str, Any]] = []
    used_refs: set[int] = set()
    multi, multi_stats = _multi_track(coco, salient, candidates, backgrounds, params, used_refs)
    tasks += multi
    single, single_stats = _single_track(coco, salient, candidates, backgrounds, params, used_refs)
    tasks += single

    source_ids = sorted({s["reference"]["image_id"] for t in tasks for s in t["subjects"]})
    sources = [_source(coco, image_id) for image_id in source_ids]
    categories_multi = sorted({s["category"] for t in multi for s in t["subjects"]})
    categories_single = sorted({s["category"] for t in single for s in t["subjects"]})
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "build": {
            "builder_version": BUILDER_VERSION,
            "params": {**params.__dict__, "subject_counts": list(params.subject_counts)},
            "coco_images_in_split": len(coco.images),
            "stats": {
                "multi": {**multi_stats, "categories": len(categories_multi)},
                "single": {**single_stats, "categories": len(categories_single)},
                "categories_covered": len(set(categories_multi) | set(categories_single)),
                "source_images": len(sources),
            },
        },
        "sources": sources,
        "tasks": tasks,
    }


def _instances(coco: CocoSplit, params: BuildParams) -> list[_Instance]:
    out = []
    for ann in sorted(coco.annotations, key=lambda a: a["id"]):
        image = coco.images.get(ann["image_id"])
        if image is None:
            raise BuildError(f"annotation {ann['id']} refers to image {ann['image_id']} missing from the split")
        h, w = image["height"], image["width"]
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        area = mask_area(ann["segmentation"], h, w)
        m = params.border_margin
        out.append(
            _Instance(
                ann_id=ann["id"],
                image_id=ann["image_id"],
                category_id=ann["category_id"],
                bbox=(x, y, bw, bh),
                segmentation=ann["segmentation"],
                area=area,
                area_ratio=area / float(h * w),
                iscrowd=bool(ann.get("iscrowd", 0)),
                touches_border=x <= m or y <= m or x + bw >= w - m or y + bh >= h - m,
            )
        )
    return out


def _reference_candidates(instances: list[_Instance], params: BuildParams) -> dict[int, list[_Instance]]:
    """Per category, usable references ranked by quality: whole (not cut by the border) first, then larger."""
    by_cat: dict[int, list[_Instance]] = defaultdict(list)
    for inst in instances:
        _, _, bw, bh = inst.bbox
        if inst.iscrowd or isinstance(inst.segmentation, dict) or min(bw, bh) < params.min_reference_side:
            continue
        by_cat[inst.category_id].append(inst)
    return {cat: sorted(insts, key=lambda i: (i.touches_border, -i.area, i.ann_id)) for cat, insts in by_cat.items()}


def _pick_reference(
    candidates: dict[int, list[_Instance]],
    category_id: int,
    scene_image_id: int,
    rng: random.Random,
    params: BuildParams,
    used_globally: set[int],
    used_in_task: set[int] = frozenset(),
) -> _Instance | None:
    """Draw a reference among the category's best candidates from other images. Two subjects of one task get
    different instances whenever the category has them; across tasks, unused instances are preferred."""
    pool = [c for c in candidates.get(category_id, []) if c.image_id != scene_image_id]
    if not pool:
        return None
    top = pool[: params.reference_pool]
    for options in (
        [c for c in top if c.ann_id not in used_globally and c.ann_id not in used_in_task],
        [c for c in top if c.ann_id not in used_in_task],
        [c for c in pool if c.ann_id not in used_in_task],
        top,
    ):
        if options:
            return rng.choice(options)
    return None


def _rng(params: BuildParams, *key: object) -> random.Random:
    digest = hashlib.sha256(":".join(str(k) for k in (params.seed, *key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _square_box(bbox: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    side = float(max(width, height))
    pad_x, pad_y = (side - width) / 2.0, (side - height) / 2.0
    x, y, bw, bh = bbox
    box = [(x + pad_x) / side, (y + pad_y) / side, (x + bw + pad_x) / side, (y + bh + pad_y) / side]
    return [round(min(max(v, 0.0), 1.0), 6) for v in box]


def _crop(inst: _Instance, coco: CocoSplit) -> list[int]:
    import math

    image = coco.images[inst.image_id]
    x, y, bw, bh = inst.bbox
    return [
        max(0, math.floor(x)),
        max(0, math.floor(y)),
        min(image["width"], math.ceil(x + bw)),
        min(image["height"], math.ceil(y + bh)),
    ]


def _subject(inst: _Instance, ref: _Instance, z: int, coco: CocoSplit) -> dict[str, Any]:
    image = coco.images[inst.image_id]
    return {
        "category": CATEGORY_NAME[inst.category_id],
        "category_id": inst.category_id,
        "box": _square_box(inst.bbox, image["width"], image["height"]),
        "z": z,
        "scene_annotation_id": inst.ann_id,
        "scene_mask_area": round(inst.area, 3),
        "reference": {
            "image_id": ref.image_id,
            "annotation_id": ref.ann_id,
            "crop": _crop(ref, coco),
            "segmentation": ref.segmentation,
            "mask_area": round(ref.area, 3),
            "touches_border": ref.touches_border,
        },
    }


def _task(
    task_id: str,
    track: str,
    scene_image_id: int,
    chosen: list[_Instance],
    refs: list[_Instance],
    coco: CocoSplit,
    backgrounds: list[str],
    rng: random.Random,
) -> dict[str, Any]:
    # Occlusion prior: the larger mask is farther (drawn first), the smaller one nearer (drawn on top).
    order = sorted(range(len(chosen)), key=lambda i: (-chosen[i].area, chosen[i].ann_id))
    z_of = {idx: z for z, idx in enumerate(order)}
    subjects = [_subject(chosen[i], refs[i], z_of[i], coco) for i in range(len(chosen))]
    background = rng.choice(backgrounds)
    captions = coco.captions.get(scene_image_id)
    return {
        "id": task_id,
        "track": track,
        "scene": {"image_id": scene_image_id, "caption": captions[0] if captions else None},
        "background": background,
        "prompt": make_prompt([s["category"] for s in subjects], background),
        "subjects": subjects,
    }


def _choose_subjects(
    scene_id: int,
    salient: list[_Instance],
    k: int,
    candidates: dict[int, list[_Instance]],
    rng: random.Random,
    params: BuildParams,
    used_refs: set[int],
) -> tuple[list[_Instance], list[_Instance]] | None:
    chosen, refs = [], []
    for inst in salient:  # largest first
        ref = _pick_reference(candidates, inst.category_id, scene_id, rng, params, used_refs, {r.ann_id for r in refs})
        if ref is None:
            continue
        chosen.append(inst)
        refs.append(ref)
        if len(chosen) == k:
            return chosen, refs
    return None


def _multi_track(coco, salient, candidates, backgrounds, params, used_refs):
    tasks: list[dict[str, Any]] = []
    used_scenes: set[int] = set()
    reused = 0
    per_k_count = {}
    # Hardest first: fewer scenes have many salient subjects, so they choose before the easy counts do.
    for k in sorted(params.subject_counts, reverse=True):
        eligible = sorted(
            image_id
            for image_id, insts in salient.items()
            if len({i.ann_id for i in insts if _has_reference(candidates, i, image_id)}) >= k
        )
        order_rng = _rng(params, "multi-order", k)
        fresh = [s for s in eligible if s not in used_scenes]
        order_rng.shuffle(fresh)
        stale = [s for s in eligible if s in used_scenes]
        order_rng.shuffle(stale)
        made: list[dict[str, Any]] = []
        for scene_id in fresh + stale:
            if len(made) == params.per_k:
                break
            task_id = f"multi-k{k}-{len(made):03d}"
            rng = _rng(params, task_id)
            picked = _choose_subjects(scene_id, salient[scene_id], k, candidates, rng, params, used_refs)
            if picked is None:
                continue
            reused += scene_id in used_scenes
            used_scenes.add(scene_id)
            used_refs.update(r.ann_id for r in picked[1])
            made.append(_task(task_id, "multi", scene_id, *picked, coco, backgrounds, rng))
        if len(made) < params.per_k:
            raise BuildError(
                f"only {len(made)} scenes with >= {k} salient subjects (beta={params.beta}) in {coco.split}; "
                f"need {params.per_k}"
            )
        per_k_count[str(k)] = len(made)
        tasks += made
    tasks.sort(key=lambda t: t["id"])
    return tasks, {
        "tasks": len(tasks),
        "tasks_per_k": per_k_count,
        "scenes_reused": reused,
        "distinct_scenes": len(used_scenes),
    }


def _has_reference(candidates: dict[int, list[_Instance]], inst: _Instance, scene_id: int) -> bool:
    return any(c.image_id != scene_id for c in candidates.get(inst.category_id, []))


def _single_track(coco, salient, candidates, backgrounds, params, used_refs):  # noqa: PLR0913
    # Per category, the scene instances to place (largest salient instance of each image, largest first).
    per_cat: dict[int, list[_Instance]] = defaultdict(list)
    for image_id, insts in sorted(salient.items()):
        seen_cats: set[int] = set()
        for inst in insts:
            if inst.category_id in seen_cats or not _has_reference(candidates, inst, image_id):
                continue
            seen_cats.add(inst.category_id)
            per_cat[inst.category_id].append(inst)
    # A category with no salient instance anywhere still gets a task from its largest usable instance, so the
    # track covers as many categories as the data allows.
    for cat, insts in candidates.items():
        if cat in per_cat:
            continue
        usable = [i for i in insts if _has_reference(candidates, i, i.image_id)]
        if usable:
            per_cat[cat].append(max(usable, key=lambda i: (i.area, -i.ann_id)))
    for insts in per_cat.values():
        insts.sort(key=lambda i: (-i.area, i.ann_id))
    tasks: list[dict[str, Any]] = []
    rounds = 0
    while len(tasks) < params.single_n and any(per_cat.values()):
        for cat in sorted(per_cat):
            if len(tasks) == params.single_n:
                break
            if rounds >= len(per_cat[cat]):
                continue
            inst = per_cat[cat][rounds]
            task_id = f"single-{len(tasks):03d}"
            rng = _rng(params, task_id)
            ref = _pick_reference(candidates, cat, inst.image_id, rng, params, used_refs)
            used_refs.add(ref.ann_id)
            tasks.append(_task(task_id, "single", inst.image_id, [inst], [ref], coco, backgrounds, rng))
        rounds += 1
        if all(rounds >= len(v) for v in per_cat.values()):
            break
    if len(tasks) < params.single_n:
        raise BuildError(f"only {len(tasks)} single-subject tasks possible in {coco.split}; need {params.single_n}")
    return tasks, {"tasks": len(tasks)}


def _source(coco: CocoSplit, image_id: int) -> dict[str, Any]:
    image = coco.images[image_id]
    path = coco.image_path(image_id)
    if not path.is_file():
        raise BuildError(f"{path}: source image of reference image {image_id} not found")
    return {
        "image_id": image_id,
        "split": coco.split,
        "file_name": image["file_name"],
        "coco_url": image.get("coco_url") or f"http://images.cocodataset.org/{coco.split}/{image['file_name']}",
        "sha256": sha256_file(path),
        "width": image["width"],
        "height": image["height"],
    }


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
