"""Build the MSIBench manifest deterministically from a COCO 2017 split.

Multi-subject track: for K = 2..5, ``per_k`` tasks each reusing the layout of a real scene with at least K
salient instances (mask area / image area > ``beta``, not crowd). The subjects are the scene's K largest salient
instances that can get a reference under the rules below (instances of a category whose pool cannot serve all its
scene instances come last, see :func:`_multi_track`); boxes are normalized to a square canvas (the scene
letterboxed: scaled by 1 / max(W, H) and centred, so box aspect ratios are kept); z-order from the occlusion prior
(smaller mask area = nearer = higher z, drawn on top).

References (paper Sec. IV-A: "a pool of ten representative subject exemplars" per category, from which each task
draws its references): per category, a pool of up to ``pool_size`` instances that pass the reference-quality rule
(:mod:`msibench.bench.quality`) and the hand review (``msibench/data/reference_review.json``), best score first and
distinct photos before a second instance of one photo, photos whose bytes are confirmed by a second source before
unconfirmed ones (:data:`UNCONFIRMED_PHOTOS`). A subject draws its reference with the seed from its category's pool,
never from the scene's own photo, never from a photo another reference of the task comes from, never from a
reference that already serves ``max_uses_per_reference`` subjects, and among the allowed entries from those used
least so far, so the subjects spread over each pool.

Single-subject track: ``single_n`` tasks with one subject, going round the categories so that as many categories as
the data allows are covered before any repeats. It draws its references first (then K = 5 down to 2), so that every
category keeps single-subject tasks under the use cap.

When the split cannot fill a track under these rules, the builder builds what it can and says so in the manifest's
``build.stats`` (``requested`` next to ``tasks``); it never relaxes the rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from msibench.bench import quality as q
from msibench.bench.manifest import MANIFEST_FORMAT
from msibench.bench.prompts import load_backgrounds, make_prompt
from msibench.cache import sha256_file
from msibench.coco import CATEGORY_NAME, CocoSplit, decode_mask, load_split, mask_area

logger = logging.getLogger(__name__)

MANIFEST_VERSION = "3"
BUILDER_VERSION = "3"
REVIEW_FORMAT = "msibench-reference-review"
REVIEW_FILE_NAME = "reference_review.json"
# val2017 photos of ../shared/data/coco2017-val-plus whose bytes no second source confirms: the 6 photos that only
# github.com/TWSFar/FCOS@536b9a29 data/COCO carries, a source that overlaps no other (its README's sources). The other
# 206 are confirmed: the 158 of the coco2017-mini slice, and 48 from lizhogn/tiny_coco_dataset, a source whose photos
# match the slice's and keras-retinanet-test-data's byte for byte where they overlap. A pool ranks confirmed photos
# first, so an unconfirmed one serves only where its category has no confirmed candidate left (docs/benchmark.md
# lists those); the manifest marks each source's ``bytes_confirmed``.
UNCONFIRMED_PHOTOS = frozenset({14473, 32811, 184762, 289343, 340272, 438017})


@dataclass(frozen=True)
class BuildParams:
    split: str = "val2017"
    seed: int = 0
    beta: float = 0.015
    subject_counts: tuple[int, ...] = (2, 3, 4, 5)
    per_k: int = 25
    single_n: int = 100
    # Clean exemplars per category that tasks draw their references from (paper Sec. IV-A: ten).
    pool_size: int = 10
    # No reference serves more subjects than this across the benchmark (issue 22: v2's only dining table served 33
    # subjects and one baby 20, so a method's score there measured one object's identity many times over). 8 of the
    # 450 subjects is under 2 %; a subject whose category has no reference below the cap is not placed (the scene
    # takes its next instance or the task is not made), the cap is never relaxed.
    max_uses_per_reference: int = 8

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "subject_counts": list(self.subject_counts)}


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


@dataclass(frozen=True)
class _PoolEntry:
    inst: _Instance
    quality: q.ReferenceQuality
    segmentation: Any  # what the manifest pins: the annotation's own, or the cleaned mask as compressed RLE

    @property
    def ann_id(self) -> int:
        return self.inst.ann_id

    @property
    def image_id(self) -> int:
        return self.inst.image_id


@dataclass(frozen=True)
class Review:
    """The hand review of reference candidates: ``accepted`` were looked at and kept, ``rejected`` maps an
    annotation id to why a careful person would not use it (what the annotation-only rule cannot see)."""

    path: str
    sha256: str
    split: str
    accepted: frozenset[int]
    rejected: dict[int, str]
    # Why each accepted one was kept (the v2 review listed accepted ids without reasons; they map to "").
    accepted_reasons: dict[int, str] = dataclasses.field(default_factory=dict)


class BuildError(RuntimeError):
    pass


def default_review_path() -> Path:
    return Path(str(resources.files("msibench") / "data" / REVIEW_FILE_NAME))


def load_review(path: str | Path | None = None) -> Review:
    path = Path(path) if path is not None else default_review_path()
    try:
        blob = path.read_bytes()
        raw = json.loads(blob)
    except (OSError, json.JSONDecodeError) as err:
        raise BuildError(f"{path}: cannot read the reference review: {err}") from err
    if not isinstance(raw, dict) or raw.get("format") != REVIEW_FORMAT:
        raise BuildError(f"{path}: field 'format': expected {REVIEW_FORMAT!r}")
    try:
        raw_accepted = raw["accepted"]
        # id -> reason; a plain list of ids (the v2 format) is accepted without reasons.
        reasons = (
            {int(k): str(v) for k, v in raw_accepted.items()}
            if isinstance(raw_accepted, dict)
            else {int(v): "" for v in raw_accepted}
        )
        rejected = {int(k): str(v) for k, v in raw["rejected"].items()}
        split = str(raw["split"])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise BuildError(
            f"{path}: needs 'split', 'accepted' (id -> reason) and 'rejected' (id -> reason): {err}"
        ) from err
    accepted = frozenset(reasons)
    both = sorted(accepted & set(rejected))
    if both:
        raise BuildError(f"{path}: annotation {both[0]} is both accepted and rejected")
    return Review(str(path), hashlib.sha256(blob).hexdigest(), split, accepted, rejected, reasons)


def build_manifest(
    coco_root: str | Path, params: BuildParams = BuildParams(), review: Review | None = None
) -> dict[str, Any]:
    """Return the manifest dict (write it with :func:`msibench.bench.manifest.dumps`)."""
    coco = load_split(coco_root, params.split)
    review = review if review is not None else load_review()
    if review.split != params.split:
        raise BuildError(f"{review.path}: reviews split {review.split}, the build reads {params.split}")
    require_photos(coco, {a["image_id"] for a in coco.annotations}, "the build")
    instances = _instances(coco)
    by_image: dict[int, list[_Instance]] = defaultdict(list)
    for inst in instances:
        by_image[inst.image_id].append(inst)
    salient = {
        image_id: sorted(
            (i for i in insts if not i.iscrowd and i.area_ratio > params.beta), key=lambda i: (-i.area, i.ann_id)
        )
        for image_id, insts in by_image.items()
    }
    pools, pool_stats = _reference_pools(coco, by_image, review, params)
    backgrounds = load_backgrounds()

    used_refs: Counter[int] = Counter()  # reference annotation id -> subjects it serves
    # The single-subject track draws first: it takes a few subjects per category, going round them, so that every
    # category keeps single-subject tasks even where the multi-subject scenes would spend its references' capped uses.
    single, single_stats = _single_track(coco, salient, instances, pools, backgrounds, params, used_refs)
    multi, multi_stats = _multi_track(coco, salient, pools, backgrounds, params, used_refs)
    tasks = multi + single

    source_ids = sorted({s["reference"]["image_id"] for t in tasks for s in t["subjects"]})
    sources = [_source(coco, image_id) for image_id in source_ids]
    categories_multi = sorted({s["category"] for t in multi for s in t["subjects"]})
    categories_single = sorted({s["category"] for t in single for s in t["subjects"]})
    references = {s["reference"]["annotation_id"] for t in tasks for s in t["subjects"]}
    uses = sorted(used_refs.values())
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "build": {
            "builder_version": BUILDER_VERSION,
            "params": params.to_json(),
            "coco_images_in_split": len(coco.images),
            "reference_rule": _rule_json(),
            "review": {
                "file": REVIEW_FILE_NAME if Path(review.path) == default_review_path() else Path(review.path).name,
                "sha256": review.sha256,
                "accepted": len(review.accepted),
                "rejected": len(review.rejected),
            },
            "pools": {
                CATEGORY_NAME[c]: [e.ann_id for e in entries] for c, entries in sorted(pools.items()) if entries
            },
            "stats": {
                "multi": {**multi_stats, "categories": len(categories_multi)},
                "single": {**single_stats, "categories": len(categories_single)},
                "categories_covered": len(set(categories_multi) | set(categories_single)),
                "distinct_references": len(references),
                "uses_per_reference": {
                    "max": uses[-1] if uses else 0,
                    "mean": round(sum(uses) / len(uses), 3) if uses else 0.0,
                },
                "source_images": len(sources),
                "unconfirmed_source_images": [s["image_id"] for s in sources if not s["bytes_confirmed"]],
                "references": pool_stats,
            },
        },
        "sources": sources,
        "tasks": tasks,
    }


def _rule_json() -> dict[str, Any]:
    names = (
        "BORDER_MARGIN_PX",
        "MAX_BORDER_RUN",
        "MIN_SIDE_PX",
        "CONTAINED_OVERLAP",
        "MAX_CONTAINED_FRACTION",
        "OCCLUDER_CONTACT_PX",
        "MAX_OCCLUSION",
        "MIN_FILL",
        "MIN_MAIN_PART",
        "MIN_THICKNESS_PX",
        "MIN_THICKNESS_RATIO",
        "THICKNESS_GRID",
    )
    return {"quality_version": q.QUALITY_VERSION, **{n.lower(): getattr(q, n) for n in names}}


def _instances(coco: CocoSplit) -> list[_Instance]:
    out = []
    for ann in sorted(coco.annotations, key=lambda a: a["id"]):
        image = coco.images.get(ann["image_id"])
        if image is None:
            raise BuildError(f"annotation {ann['id']} refers to image {ann['image_id']} missing from the split")
        h, w = image["height"], image["width"]
        area = mask_area(ann["segmentation"], h, w)
        out.append(
            _Instance(
                ann_id=ann["id"],
                image_id=ann["image_id"],
                category_id=ann["category_id"],
                bbox=tuple(float(v) for v in ann["bbox"]),  # type: ignore[arg-type]
                segmentation=ann["segmentation"],
                area=area,
                area_ratio=area / float(h * w),
                iscrowd=bool(ann.get("iscrowd", 0)),
            )
        )
    return out


def assess_split(coco: CocoSplit, by_image: dict[int, list[_Instance]]) -> dict[int, tuple[q.ReferenceQuality, Any]]:
    """Every non-crowd instance's verdict under the reference rule, with the segmentation a reference of it pins
    (the annotation's own, or its cleaned mask as compressed RLE when contained instances are subtracted from the
    cut-out: never while :data:`msibench.bench.quality.CUTOUT_KEEPS_CONTAINED`)."""
    from pycocotools import mask as mask_utils

    out = {}
    for image_id in sorted(by_image):
        insts = by_image[image_id]
        image = coco.images[image_id]
        h, w = image["height"], image["width"]
        photo = [q.PhotoInstance(i.ann_id, i.category_id, i.bbox, i.iscrowd) for i in insts]
        masks = [decode_mask(i.segmentation, h, w).astype(bool) for i in insts]
        verdicts = q.assess_photo(photo, masks, w, h)
        for inst in insts:
            if inst.iscrowd:
                continue
            verdict = verdicts[inst.ann_id]
            segmentation = inst.segmentation
            if q.cutout_subtracted(verdict):
                cleaned = q.reference_mask(verdict, photo, masks)
                rle = mask_utils.encode(np.asfortranarray(cleaned.astype(np.uint8)))
                segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            out[inst.ann_id] = (verdict, segmentation)
    return out


def _reference_pools(
    coco: CocoSplit, by_image: dict[int, list[_Instance]], review: Review, params: BuildParams
) -> tuple[dict[int, list[_PoolEntry]], dict[str, Any]]:
    """Per category, up to ``pool_size`` clean, reviewed-or-unreviewed-but-not-rejected candidates, best first."""
    assessed = assess_split(coco, by_image)
    by_id = {i.ann_id: i for insts in by_image.values() for i in insts}
    per_cat: dict[int, list[_PoolEntry]] = defaultdict(list)
    causes: dict[str, int] = defaultdict(int)
    review_rejected = 0
    for ann_id, (verdict, segmentation) in sorted(assessed.items()):
        for cause in verdict.causes:
            causes[cause] += 1
        if not verdict.clean:
            continue
        if ann_id in review.rejected:
            review_rejected += 1
            continue
        per_cat[verdict.category_id].append(_PoolEntry(by_id[ann_id], verdict, segmentation))
    pools: dict[int, list[_PoolEntry]] = {}
    for cat, entries in sorted(per_cat.items()):
        # Confirmed photos first (an unconfirmed one only fills a slot no confirmed candidate can), then best score
        # first, one instance per photo before any photo's second: the pool spans as many photos (identities,
        # viewpoints, backgrounds) as the data has.
        entries.sort(key=lambda e: (-e.quality.score, e.ann_id))
        rank_in_photo: dict[int, int] = defaultdict(int)
        keyed = []
        for e in entries:
            unconfirmed = e.image_id in UNCONFIRMED_PHOTOS
            keyed.append(((unconfirmed, rank_in_photo[e.image_id], -e.quality.score, e.ann_id), e))
            rank_in_photo[e.image_id] += 1
        pools[cat] = [e for _, e in sorted(keyed, key=lambda p: p[0])][: params.pool_size]
    members = [e for entries in pools.values() for e in entries]
    unreviewed = sorted(e.ann_id for e in members if e.ann_id not in review.accepted)
    if unreviewed:
        logger.warning(
            "%d pool references were never reviewed by eye (e.g. annotation %d): look at `msibench bench "
            "contact-sheet` and add them to %s",
            len(unreviewed),
            unreviewed[0],
            review.path,
        )
    stats = {
        "candidates": len(assessed),
        "clean": sum(v.clean for v, _ in assessed.values()),
        "rejected_by_rule": dict(sorted(causes.items())),
        "rejected_by_review": review_rejected,
        "pool_categories": len(pools),
        "pool_references": len(members),
        "pool_unreviewed": len(unreviewed),
        "pool_with_subtracted_instances": sum(bool(q.cutout_subtracted(e.quality)) for e in members),
        "pool_with_contained_instances_kept": sum(bool(e.quality.subtracted) for e in members),
        "pool_from_unconfirmed_photos": sum(e.image_id in UNCONFIRMED_PHOTOS for e in members),
    }
    return pools, stats


def _pick_reference(  # noqa: PLR0913
    pools: dict[int, list[_PoolEntry]],
    category_id: int,
    scene_image_id: int,
    rng: random.Random,
    uses: Counter[int],
    max_uses: int,
    photos_in_task: set[int] = frozenset(),
) -> _PoolEntry | None:
    """Draw a reference from the category's pool: never from the scene's photo, never from a photo another reference
    of the task comes from, never one that serves ``max_uses`` subjects already (None when no entry is left); among
    the allowed entries, one of those used least so far."""
    eligible = [
        e
        for e in pools.get(category_id, [])
        if e.image_id != scene_image_id and e.image_id not in photos_in_task and uses[e.ann_id] < max_uses
    ]
    if not eligible:
        return None
    least = min(uses[e.ann_id] for e in eligible)
    return rng.choice([e for e in eligible if uses[e.ann_id] == least])


def _rng(params: BuildParams, *key: object) -> random.Random:
    digest = hashlib.sha256(":".join(str(k) for k in (params.seed, *key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _square_box(bbox: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    side = float(max(width, height))
    pad_x, pad_y = (side - width) / 2.0, (side - height) / 2.0
    x, y, bw, bh = bbox
    box = [(x + pad_x) / side, (y + pad_y) / side, (x + bw + pad_x) / side, (y + bh + pad_y) / side]
    return [round(min(max(v, 0.0), 1.0), 6) for v in box]


def _subject(inst: _Instance, ref: _PoolEntry, z: int, coco: CocoSplit) -> dict[str, Any]:
    image = coco.images[inst.image_id]
    x0, y0, x1, y1 = ref.quality.box
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
            "crop": [x0, y0, x1, y1],
            "segmentation": ref.segmentation,
            "mask_area": float(ref.quality.mask_area),
            "touches_border": ref.quality.truncated,
            "subtracted": list(q.cutout_subtracted(ref.quality)),
            # Contained instances that stay inside the cut-out (quality.CUTOUT_KEEPS_CONTAINED).
            "contained": list(ref.quality.subtracted),
            "quality_score": round(ref.quality.score, 3),
        },
    }


def _task(
    task_id: str,
    track: str,
    scene_image_id: int,
    chosen: list[_Instance],
    refs: list[_PoolEntry],
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


def _choose_subjects(  # noqa: PLR0913
    scene_id: int,
    salient: list[_Instance],
    k: int,
    pools: dict[int, list[_PoolEntry]],
    rng: random.Random,
    used_refs: Counter[int],
    max_uses: int,
    scarce: frozenset[int] = frozenset(),
) -> tuple[list[_Instance], list[_PoolEntry]] | None:
    """The scene's K subjects with their references, or None when the rules leave no way to place K.

    Subjects: the salient instances that can get a reference, largest first, except that instances of a ``scarce``
    category come after all the others (taken only to complete K). References: for each subject, an allowed pool
    entry (not from the scene's photo, nor from a photo another reference of the task comes from, below
    ``max_uses``), least used first (seeded order within equal use). A search over these choices in that order
    backs off only where a choice leaves the later subjects no reference, so a greedy draw never loses a task that
    the rules allow."""
    order = sorted(salient, key=lambda i: (i.category_id in scarce, -i.area, i.ann_id))
    options = []
    for inst in order:
        entries = [
            e for e in pools.get(inst.category_id, []) if e.image_id != scene_id and used_refs[e.ann_id] < max_uses
        ]
        rng.shuffle(entries)
        entries.sort(key=lambda e: used_refs[e.ann_id])  # stable: least used first, seeded within equal use
        if entries:
            options.append((inst, entries))
    photos_after = [set() for _ in range(len(options) + 1)]  # photos the options from i on could still use
    for i in range(len(options) - 1, -1, -1):
        photos_after[i] = photos_after[i + 1] | {e.image_id for e in options[i][1]}
    chosen: list[tuple[_Instance, _PoolEntry]] = []

    def search(i: int, photos: frozenset[int]) -> bool:
        need = k - len(chosen)
        if need == 0:
            return True
        if len(options) - i < need or len(photos_after[i] - photos) < need:
            return False
        inst, entries = options[i]
        for entry in entries:
            if entry.image_id in photos:
                continue
            chosen.append((inst, entry))
            if search(i + 1, photos | {entry.image_id}):
                return True
            chosen.pop()
        return search(i + 1, photos)  # this instance cannot be placed alongside the earlier ones: skip it

    if not search(0, frozenset()):
        return None
    return [inst for inst, _ in chosen], [entry for _, entry in chosen]


def _placeable(salient: list[_Instance], pools: dict[int, list[_PoolEntry]], scene_id: int) -> int:
    """How many of a scene's salient instances can get distinct references from outside the scene."""
    wanted: dict[int, int] = defaultdict(int)
    for inst in salient:
        wanted[inst.category_id] += 1
    return sum(min(n, sum(e.image_id != scene_id for e in pools.get(cat, []))) for cat, n in wanted.items())


def _scarce_categories(salient, pools, params) -> frozenset[int]:
    """Categories whose pool cannot serve all their salient instances in the multi-subject scenes: more such
    instances than the pool's references x ``max_uses_per_reference`` (on val-plus: person alone)."""
    lowest_k = min(params.subject_counts)
    demand: Counter[int] = Counter()
    for image_id, insts in salient.items():
        if _placeable(insts, pools, image_id) >= lowest_k:
            demand.update(i.category_id for i in insts if pools.get(i.category_id))
    return frozenset(cat for cat, n in demand.items() if n > len(pools[cat]) * params.max_uses_per_reference)


def _multi_track(coco, salient, pools, backgrounds, params, used_refs):
    """Hardest K first. A scarce category's references (:func:`_scarce_categories`) would run out in the first
    scenes that use them, leaving later scenes unfillable: so a scene takes such subjects only to complete K, and
    scenes that need fewer of them go first (scenes no K has used before those already used, a seeded order within
    equal need)."""
    tasks: list[dict[str, Any]] = []
    used_scenes: set[int] = set()
    reused = 0
    per_k_count, eligible_per_k = {}, {}
    scarce = _scarce_categories(salient, pools, params)

    def scarce_need(scene_id: int, k: int) -> int:
        others = [i for i in salient[scene_id] if i.category_id not in scarce]
        return max(0, k - _placeable(others, pools, scene_id))

    for k in sorted(params.subject_counts, reverse=True):
        eligible = sorted(image_id for image_id, insts in salient.items() if _placeable(insts, pools, image_id) >= k)
        _rng(params, "multi-order", k).shuffle(eligible)
        order = sorted(eligible, key=lambda s: (s in used_scenes, scarce_need(s, k)))  # stable: seeded within ties
        made: list[dict[str, Any]] = []
        for scene_id in order:
            if len(made) == params.per_k:
                break
            task_id = f"multi-k{k}-{len(made):03d}"
            rng = _rng(params, task_id)
            picked = _choose_subjects(
                scene_id, salient[scene_id], k, pools, rng, used_refs, params.max_uses_per_reference, scarce
            )
            if picked is None:
                continue
            reused += scene_id in used_scenes
            used_scenes.add(scene_id)
            used_refs.update(r.ann_id for r in picked[1])
            made.append(_task(task_id, "multi", scene_id, *picked, coco, backgrounds, rng))
        if len(made) < params.per_k:
            logger.warning(
                "K=%d: only %d of %d tasks: %d scenes of %s have >= %d salient subjects (beta=%g) with clean "
                "references from other photos, and a reference serves at most %d subjects",
                k, len(made), params.per_k, len(eligible), coco.split, k, params.beta, params.max_uses_per_reference,
            )  # fmt: skip
        per_k_count[str(k)] = len(made)
        eligible_per_k[str(k)] = len(eligible)
        tasks += made
    tasks.sort(key=lambda t: t["id"])
    return tasks, {
        "requested": params.per_k * len(params.subject_counts),
        "tasks": len(tasks),
        "tasks_per_k": per_k_count,
        "eligible_scenes_per_k": eligible_per_k,
        "scarce_categories": sorted(CATEGORY_NAME[c] for c in scarce),
        "scenes_reused": reused,
        "distinct_scenes": len(used_scenes),
    }


# A single-subject task's box comes from a scene instance at least this many pixels wide and high (about 13 px on
# the 256 px output canvas), so that the subject has room to show its identity.
SINGLE_MIN_BOX_PX = 32


def _single_track(coco, salient, instances, pools, backgrounds, params, used_refs):  # noqa: PLR0913
    def usable(inst: _Instance) -> bool:
        return any(e.image_id != inst.image_id for e in pools.get(inst.category_id, []))

    # Per category, the scene instances to place (largest salient instance of each image, largest first).
    per_cat: dict[int, list[_Instance]] = defaultdict(list)
    for _, insts in sorted(salient.items()):
        seen_cats: set[int] = set()
        for inst in insts:
            if inst.category_id in seen_cats or not usable(inst):
                continue
            seen_cats.add(inst.category_id)
            per_cat[inst.category_id].append(inst)
    # A category with no salient instance anywhere still gets a task from its largest usable instance, so the
    # track covers as many categories as the data allows.
    others: dict[int, list[_Instance]] = defaultdict(list)
    for inst in instances:
        if inst.category_id in per_cat or inst.iscrowd or min(inst.bbox[2:]) < SINGLE_MIN_BOX_PX or not usable(inst):
            continue
        others[inst.category_id].append(inst)
    for cat, insts in others.items():
        per_cat[cat].append(max(insts, key=lambda i: (i.area, -i.ann_id)))
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
            ref = _pick_reference(pools, cat, inst.image_id, rng, used_refs, params.max_uses_per_reference)
            if ref is None:  # every reference of the category serves max_uses_per_reference subjects already
                continue
            used_refs[ref.ann_id] += 1
            tasks.append(_task(task_id, "single", inst.image_id, [inst], [ref], coco, backgrounds, rng))
        rounds += 1
        if all(rounds >= len(v) for v in per_cat.values()):
            break
    if len(tasks) < params.single_n:
        logger.warning("single track: only %d of %d tasks possible in %s", len(tasks), params.single_n, coco.split)
    return tasks, {"requested": params.single_n, "tasks": len(tasks)}


def _source(coco: CocoSplit, image_id: int) -> dict[str, Any]:
    image = coco.images[image_id]
    path = coco.image_path(image_id)
    if not path.is_file():
        raise BuildError(f"{path}: source image of reference image {image_id} not found")
    return {
        "image_id": image_id,
        "bytes_confirmed": image_id not in UNCONFIRMED_PHOTOS,
        "split": coco.split,
        "file_name": image["file_name"],
        "coco_url": image.get("coco_url") or f"http://images.cocodataset.org/{coco.split}/{image['file_name']}",
        "sha256": sha256_file(path),
        "width": image["width"],
        "height": image["height"],
    }


def require_photos(coco: CocoSplit, image_ids: set[int] | list[int], who: str) -> None:
    """Fail, before any work, naming every photo of ``image_ids`` that is not under the COCO root.

    ``bench build`` asks for every annotated photo of the split: any of them may hold a pool reference, and the
    manifest pins the sha256 of those its tasks use (which ones is only known at the end of the build)."""
    folder = Path(coco.root) / coco.split
    # An annotation of an image the split does not list is reported by the build itself, naming the annotation.
    listed = [i for i in image_ids if i in coco.images]
    missing = sorted(coco.images[i]["file_name"] for i in listed if not coco.image_path(i).is_file())
    if not missing:
        return
    where = f"{folder} does not exist" if not folder.is_dir() else f"not in {folder}"
    raise BuildError(
        f"{who} needs {len(listed)} photos of {coco.split} and {len(missing)} are missing ({where}); put the COCO "
        f"2017 originals there (http://images.cocodataset.org/zips/{coco.split}.zip) and run it again. Missing: "
        + ", ".join(missing)
    )


def reference_pools(
    coco: CocoSplit, params: BuildParams, review: Review
) -> tuple[dict[int, list[_PoolEntry]], dict[str, Any]]:
    """Per category id, the pool that :func:`build_manifest` with these ``params`` and ``review`` draws references
    from (best first), and its statistics; ``msibench bench review`` shows the members not reviewed yet."""
    by_image: dict[int, list[_Instance]] = defaultdict(list)
    for inst in _instances(coco):
        by_image[inst.image_id].append(inst)
    return _reference_pools(coco, by_image, review, params)
