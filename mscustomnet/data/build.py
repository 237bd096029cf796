"""Builder of the Multi-Subject Interaction (MSI) dataset from COCO (paper Sec. III-A, Fig. 1b, Eq. 1-5).

Stages, each resumable:
1. filter (annotations only): salient instances and kept scenes, see ``coco.py``;
2. reference pools: every instance is judged by the reference-quality rule shared with MSIBench
   (:mod:`msibench.bench.quality`: truncation, size, containment, occlusion, fragments, slivers); per category, up to
   ``pool_size`` instances ranked by it (clean ones best score first; rejected ones only fill a pool whose category
   lacks clean ones), one per photo, cut out (contained instances subtracted) and saved
   (``pool/<category id>/<annotation id>.png`` and ``..._mask.png``) and listed in ``pool.json`` with the rule's
   verdicts per category;
3. tuples: per kept scene, a reference per salient subject (drawn without replacement within the scene, clean pool
   entries first), the layout map (``layouts/<image id>.png``), the prompt,
   one line of ``manifest.jsonl`` (the line is the commit marker); scenes that cannot be built go to ``skipped.jsonl``;
4. ``stats.json``, recomputed from the files so a resumed build writes the same bytes as an uninterrupted one.

Everything is at the original image size (the paper does no resizing or cropping); the training Dataset does that.
Randomness is drawn per scene from (seed, image id), so the output depends on neither worker count nor resume point.

One build per output folder at a time: a second one is refused (:class:`~msibench.records.LockBusyError`); under
that lock the temp files of a killed build are removed. ``config.json`` is written only once the inputs have been
read successfully, and it identifies COCO by content (the sha256 of the annotation files), not by path, so a build
resumes from a copy of COCO at another path (``config.json`` then records the new path, where the Dataset finds the
photos).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mscustomnet.data.coco import ALPHA, BETA, CocoInstances, decode_mask, filter_scenes, load_captions, load_instances
from mscustomnet.data.layout import Placement, compose_layout_map, paint_order, reference_crop
from msibench.bench import quality
from msibench.cache import remove_stale_temp_files, sha256_file
from msibench.records import exclusive_or_busy

log = logging.getLogger(__name__)

# 3: MSI-only pool rules on top of the shared reference rule (fallbacks spanning the frame, blurred references).
FORMAT_VERSION = 3
# Why a candidate is rejected: the shared rule's causes, then the MSI pool's own (msibench.bench.quality, "MSI
# training-pool measures"). A blurred reference is a worse view of one whole object, like a small one: it may still
# fill a pool that lacks clean references, ranked after them; one spanning the frame never serves.
MSI_CAUSES = (*quality.CAUSES, quality.SPANS_FRAME_CAUSE, quality.BLURRED_CAUSE)
MSI_FALLBACK_CAUSES = (*quality.FALLBACK_CAUSES, quality.BLURRED_CAUSE)
POOL_SIZE = 30

CONFIG_FILE = "config.json"
POOL_FILE = "pool.json"
MANIFEST_FILE = "manifest.jsonl"
SKIPPED_FILE = "skipped.jsonl"
STATS_FILE = "stats.json"
POOL_DIR = "pool"
LAYOUT_DIR = "layouts"


@dataclass(frozen=True)
class BuildConfig:
    coco_root: Path
    split: str
    out: Path
    alpha: int = ALPHA
    beta: float = BETA
    pool_size: int = POOL_SIZE
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {self.pool_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def instances_file(self) -> Path:
        return Path(self.coco_root) / "annotations" / f"instances_{self.split}.json"

    @property
    def captions_file(self) -> Path:
        return Path(self.coco_root) / "annotations" / f"captions_{self.split}.json"

    @property
    def image_dir(self) -> Path:
        return Path(self.coco_root) / self.split

    def identity(self) -> dict[str, Any]:
        """Everything that changes the output (not ``workers``, ``out`` or where COCO lies): a resumed build must
        match it. COCO is identified by the content of its annotation files (images, instances and their ids)."""
        return {
            "format_version": FORMAT_VERSION,
            "coco": coco_content_id(self.instances_file, self.captions_file),
            "split": self.split,
            "alpha": self.alpha,
            "beta": self.beta,
            "pool_size": self.pool_size,
            "seed": self.seed,
            "reference_quality_version": quality.QUALITY_VERSION,
        }


@dataclass(frozen=True)
class PoolEntry:
    ann_id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    mask_area: int  # pixels of the saved mask (contained instances subtracted)
    causes: tuple[str, ...] = ()  # why the reference-quality rule rejects it; empty when clean
    score: float = 0.0
    subtracted: tuple[int, ...] = ()  # contained instances cut out of its mask

    @property
    def clean(self) -> bool:
        return not self.causes

    @property
    def file(self) -> str:
        return f"{POOL_DIR}/{self.category_id}/{self.ann_id}.png"

    @property
    def mask_file(self) -> str:
        return f"{POOL_DIR}/{self.category_id}/{self.ann_id}_mask.png"

    def to_json(self) -> dict[str, Any]:
        return {
            "ann_id": self.ann_id,
            "image_id": self.image_id,
            "category_id": self.category_id,
            "bbox": list(self.bbox),
            "mask_area": self.mask_area,
            "clean": self.clean,
            "causes": list(self.causes),
            "score": round(self.score, 4),
            "subtracted": list(self.subtracted),
            "file": self.file,
            "mask_file": self.mask_file,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PoolEntry:
        return cls(
            ann_id=int(d["ann_id"]),
            image_id=int(d["image_id"]),
            category_id=int(d["category_id"]),
            bbox=tuple(float(v) for v in d["bbox"]),  # type: ignore[arg-type]
            mask_area=int(d["mask_area"]),
            causes=tuple(str(c) for c in d["causes"]),
            score=float(d["score"]),
            subtracted=tuple(int(v) for v in d["subtracted"]),
        )


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    scenes_kept: int
    scenes_written: int
    scenes_skipped: int
    filter_seconds: float
    # photos the annotations name that are missing, truncated, undecodable or of another size than annotated: the
    # build left them out, so the dataset differs from one over an intact COCO (the command exits 3)
    photo_problems: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------- files


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def save_png_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_jsonl_committed(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written line by line; a partial last line (killed mid-write) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        log.warning("%s: dropping a partial last line left by an interrupted build", path)
        with path.open("r+b") as f:
            f.truncate(end)
        data = data[:end]
    return parse_jsonl(path, data, "; rebuild into a new folder")


def parse_jsonl(path: Path, data: bytes, remedy: str = "") -> list[dict[str, Any]]:
    """The records of the complete lines ``data`` of the JSONL file ``path``; a line that is not JSON is a
    ValueError naming the file and line (``remedy`` appended)."""
    records = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON ({e}){remedy}") from e
    return records


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def coco_content_id(instances_file: Path, captions_file: Path) -> dict[str, Any]:
    """COCO as content: the sha256 of the instances file (which lists the split's image ids, sizes and
    annotations) and of the captions file (None when absent: prompts then come from category names)."""
    out: dict[str, Any] = {}
    for key, path, required in (("instances_sha256", instances_file, True), ("captions_sha256", captions_file, False)):
        try:
            stat = Path(path).stat()
        except FileNotFoundError:
            if required:
                raise FileNotFoundError(
                    f"{path}: COCO annotation file not found; --coco-root must be a COCO 2017 root holding "
                    f"annotations/ and the split's image folder"
                ) from None
            out[key] = None
            continue
        out[key] = _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    return out


# Written into config.json beside the identity, never compared: where this build last read COCO from.
_LOCATION_KEYS = ("coco_root",)


def _check_config(config: BuildConfig) -> bool:
    """Refuse a folder holding a build with another identity; return whether config.json must be written."""
    path = Path(config.out) / CONFIG_FILE
    identity = config.identity()
    if not path.is_file():
        return True
    previous = {k: v for k, v in json.loads(path.read_text()).items() if k not in _LOCATION_KEYS}
    changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {identity.get(k)!r}" for k in changed)
        raise ValueError(f"{Path(config.out)} holds a build with other settings ({details}); use another --out")
    return json.loads(path.read_text()).get("coco_root") != str(Path(config.coco_root).resolve())


def _write_config(config: BuildConfig) -> None:
    write_json_atomic(
        Path(config.out) / CONFIG_FILE, {**config.identity(), "coco_root": str(Path(config.coco_root).resolve())}
    )


# ----------------------------------------------------------------------------------------------------------- pools


def _assess_photo(task: tuple[int, int, int, str, list[tuple[int, int, tuple[float, ...], bool, Any]]]):
    """The reference-quality verdicts of one photo's instances (worker side), with the MSI pool's own causes."""
    image_id, width, height, image_path, anns = task
    instances = [quality.PhotoInstance(ann_id, cat, bbox, crowd) for ann_id, cat, bbox, crowd, _ in anns]
    masks = [decode_mask(seg, height, width, where=f"annotation {ann_id}") for ann_id, _, _, _, seg in anns]
    verdicts = quality.assess_photo(instances, masks, width, height)
    return image_id, msi_verdicts(verdicts, instances, masks, Path(image_path), width, height)


def msi_verdicts(
    verdicts: dict[int, quality.ReferenceQuality],
    instances: list[quality.PhotoInstance],
    masks: list[np.ndarray],
    image_path: Path,
    width: int,
    height: int,
) -> dict[int, quality.ReferenceQuality]:
    """The shared rule's verdicts of one photo with the MSI pool's causes added: a fallback cut by the frame whose
    box reaches two opposite edges of the photo ``spans_frame``; a clean reference whose sharpness is below
    :data:`msibench.bench.quality.MIN_SHARPNESS` is ``blurred`` instead. The photo is read only when it has a clean
    instance; when it cannot be read the verdicts stay as they are (cutting the reference fails later, and the
    candidate is skipped with the reason)."""
    out = dict(verdicts)
    grey: np.ndarray | None = None
    if any(v.clean for v in verdicts.values()):
        rgb, _ = _open_rgb(image_path, width, height)
        grey = None if rgb is None else np.asarray(Image.fromarray(rgb).convert("L"))
    for ann_id, verdict in verdicts.items():
        if not verdict.clean and verdict.truncated and all(c in MSI_FALLBACK_CAUSES for c in verdict.causes):
            if quality.spans_frame(verdict.box, width, height):
                out[ann_id] = dataclasses.replace(verdict, causes=(*verdict.causes, quality.SPANS_FRAME_CAUSE))
        elif verdict.clean and grey is not None:
            x0, y0, x1, y1 = verdict.box
            mask = quality.reference_mask(verdict, instances, masks)[y0:y1, x0:x1]
            if quality.sharpness(grey[y0:y1, x0:x1], mask) < quality.MIN_SHARPNESS:
                out[ann_id] = dataclasses.replace(verdict, causes=(quality.BLURRED_CAUSE,))
    return out


def msi_usable(verdict: quality.ReferenceQuality) -> bool:
    """Clean, or rejected only for :data:`MSI_FALLBACK_CAUSES`: may serve in an MSI pool."""
    return all(cause in MSI_FALLBACK_CAUSES for cause in verdict.causes)


def assess_references(
    coco: CocoInstances, image_dir: Path, run: Callable[[Callable, Iterable], Iterator], progress: bool = False
) -> dict[int, quality.ReferenceQuality]:
    """Row index -> the reference-quality verdict (:func:`msi_verdicts`) of every non-crowd instance with a non-empty
    mask; ``image_dir`` holds the photos (read for the sharpness of clean instances)."""
    order = np.lexsort((coco.ann_ids, coco.image_ids))
    ids, starts = np.unique(coco.image_ids[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    row_of = {int(coco.ann_ids[r]): int(r) for r in order.tolist()}

    def tasks() -> Iterator[tuple]:
        for i, image_id in enumerate(ids.tolist()):
            rows = order[bounds[i] : bounds[i + 1]].tolist()
            image = coco.images[image_id]
            anns = [(int(coco.ann_ids[r]), int(coco.category_ids[r]), tuple(coco.bboxes[r].tolist()),
                     bool(coco.iscrowd[r]), coco.segmentations[r]) for r in rows]  # fmt: skip
            yield image_id, image.width, image.height, str(Path(image_dir) / image.file_name), anns

    verdicts: dict[int, quality.ReferenceQuality] = {}
    results = run(_assess_photo, tasks())
    for _, photo in tqdm(results, total=len(ids), desc="reference quality", disable=not progress, unit="photo"):
        for ann_id, verdict in photo.items():
            row = row_of[ann_id]
            if coco.mask_areas[row] > 0:
                verdicts[row] = verdict
    return verdicts


def rank_pool_candidates(coco: CocoInstances, verdicts: dict[int, quality.ReferenceQuality]) -> dict[int, np.ndarray]:
    """Per category, the row indices of pool candidates best first.

    Clean instances come before every rejected one; rejected ones only fill a pool whose category lacks clean
    instances, and only those rejected for a worse view of one whole object (:data:`MSI_FALLBACK_CAUSES`: truncated,
    small, occluded, blurred), never containers, fragments, slivers or fallbacks spanning the frame. Within each
    group, every photo's best instance comes before any photo's second, so a pool spans as many photos as the data
    has; then :func:`msibench.bench.quality.rank_key` (score, for rejected ones fewer causes first)."""
    by_category: dict[int, list[int]] = {}
    usable = [row for row in verdicts if msi_usable(verdicts[row])]
    for row in sorted(usable, key=lambda r: quality.rank_key(verdicts[r])):
        by_category.setdefault(verdicts[row].category_id, []).append(row)
    ranked = {}
    for category, rows in sorted(by_category.items()):
        seen: Counter[tuple[bool, int]] = Counter()
        keyed = []
        for position, row in enumerate(rows):
            group = (not verdicts[row].clean, int(coco.image_ids[row]))
            keyed.append((group[0], seen[group], position, row))
            seen[group] += 1
        ranked[category] = np.array([row for *_, row in sorted(keyed)], dtype=np.int64)
    return ranked


def rule_summary(coco: CocoInstances, verdicts: dict[int, quality.ReferenceQuality]) -> dict[str, Any]:
    """What the reference-quality rule found, per category: candidates, clean ones and rejections per cause (an
    instance may have several causes); crowd annotations are never candidates."""
    per_category = {
        name: {"candidates": 0, "clean": 0, "rejected": 0, "causes": dict.fromkeys(MSI_CAUSES, 0)}
        for _, name in sorted(coco.categories.items())
    }
    for verdict in verdicts.values():
        entry = per_category[coco.categories[verdict.category_id]]
        entry["candidates"] += 1
        entry["clean"] += verdict.clean
        entry["rejected"] += not verdict.clean
        for cause in verdict.causes:
            entry["causes"][cause] += 1
    return {"quality_version": quality.QUALITY_VERSION, "per_category": per_category}


def _cut_reference(task: tuple[str, Any, tuple[float, ...], int, int, str, str, list[Any]]) -> str | None:
    """Cut one pool instance out of its photo (minus the contained instances it keeps out) and save crop + mask.
    Returns an error reason, or None."""
    image_path, segmentation, bbox, width, height, rgb_path, mask_path, subtract = task
    if Path(rgb_path).is_file() and Path(mask_path).is_file():
        return None  # written by an earlier, interrupted run: files only appear complete (atomic replace)
    image, reason = _open_rgb(Path(image_path), width, height)
    if image is None:
        return reason
    mask = decode_mask(segmentation, height, width, where=image_path)
    for other in subtract:
        mask &= ~decode_mask(other, height, width, where=image_path)
    rgb, mask_u8 = reference_crop(image, mask, bbox)
    save_png_atomic(Path(mask_path), mask_u8)
    save_png_atomic(Path(rgb_path), rgb)
    return None


# Every reason _open_rgb gives starts with this: a skip for a damaged photo (not a rule of the build), which a resume
# checks again (see _recheck_photos).
PHOTO_PROBLEM = "image "


def _open_rgb(path: Path, width: int, height: int) -> tuple[np.ndarray | None, str]:
    """Fully decoded RGB pixels of a photo, or (None, reason) when it is missing, corrupt or of another size than
    its annotation says (each photo is checked as it is read: size, then a full decode)."""
    if not path.is_file():
        return None, f"image file missing: {path}"
    try:
        with Image.open(path) as img:
            if img.size != (width, height):
                return None, f"image {path} is {img.size[0]}x{img.size[1]}, annotations say {width}x{height}"
            img.load()
            return np.asarray(img.convert("RGB")), ""
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"image {path} cannot be decoded: {e}"


def _photo_problem(reason: str | None) -> bool:
    return bool(reason) and str(reason).startswith(PHOTO_PROBLEM)


def _recheck_photos(config: BuildConfig, out: Path, coco: CocoInstances) -> None:
    """On a resume: photos an earlier pass skipped as damaged are read again. One that reads now (restored, or the
    build now runs on a repaired COCO) changes what it affects, which is rebuilt: a pool candidate changes the
    reference pools and so every scene (pool.json, pool/, manifest.jsonl, skipped.jsonl and layouts/ are set aside
    and built again: the cut-outs of the candidates that stood in for it must not stay behind); a scene's own photo
    changes that scene (its skip record is dropped, so it is built now)."""
    pool_path, skipped_path = out / POOL_FILE, out / SKIPPED_FILE
    if pool_path.is_file():
        _, pool_skipped, _ = _load_pools(pool_path)
        for skip in pool_skipped:
            if not _photo_problem(skip.get("reason")):
                continue
            image = coco.images.get(int(skip["image_id"]))
            if (
                image is not None
                and _open_rgb(config.image_dir / image.file_name, image.width, image.height)[0] is not None
            ):
                log.warning(
                    "photo %s was skipped as damaged by an earlier pass and reads now: rebuilding the reference pools "
                    "and every scene that draws from them",
                    image.file_name,
                )
                stale = out / f".stale-{os.getpid()}"
                stale.mkdir(exist_ok=True)
                for name in (POOL_FILE, POOL_DIR, MANIFEST_FILE, SKIPPED_FILE, STATS_FILE, LAYOUT_DIR):
                    if (out / name).exists():
                        os.replace(out / name, stale / name)
                shutil.rmtree(stale, ignore_errors=True)
                return
    if skipped_path.is_file():
        kept, changed = [], False
        for skip in read_jsonl_committed(skipped_path):
            image = coco.images.get(int(skip["image_id"]))
            if _photo_problem(skip.get("reason")) and image is not None:
                if _open_rgb(config.image_dir / image.file_name, image.width, image.height)[0] is not None:
                    log.warning("photo %s reads now: building its scene", image.file_name)
                    changed = True
                    continue
            kept.append(skip)
        if changed:
            write_bytes_atomic(skipped_path, b"".join((json.dumps(r) + "\n").encode("utf-8") for r in kept))


def build_pools(
    coco: CocoInstances,
    config: BuildConfig,
    run: Callable[[Callable, Iterable], Iterator],
    progress: bool,
    verdicts: dict[int, quality.ReferenceQuality] | None = None,
) -> tuple[dict[int, list[PoolEntry]], list[dict[str, Any]]]:
    """Choose, cut and save every category's reference pool (its first ``pool_size`` candidates in
    :func:`rank_pool_candidates` order); returns the pools and the skipped candidates. Candidates whose photo cannot
    be read are reported and replaced by the next-ranked candidate.
    """
    out = Path(config.out)
    verdicts = verdicts if verdicts is not None else assess_references(coco, config.image_dir, run)
    ranked = rank_pool_candidates(coco, verdicts)
    row_of = {int(a): i for i, a in enumerate(coco.ann_ids.tolist())}
    pools: dict[int, list[PoolEntry]] = {c: [] for c in sorted(coco.categories)}
    cursor = {c: 0 for c in ranked}
    bad_images: dict[int, str] = {}
    skipped: list[dict[str, Any]] = []
    bar = tqdm(
        total=sum(min(config.pool_size, len(rows)) for rows in ranked.values()),
        desc="reference pools",
        disable=not progress,
        unit="ref",
    )
    while True:
        # One round: the next candidates that would fill every pool if they all open; failures are refilled next round.
        batch: list[tuple[int, int]] = []
        for category, rows in ranked.items():
            need = config.pool_size - len(pools[category])
            while need > 0 and cursor[category] < len(rows):
                row = int(rows[cursor[category]])
                cursor[category] += 1
                if int(coco.image_ids[row]) in bad_images:
                    continue
                batch.append((category, row))
                need -= 1
        if not batch:
            break
        tasks = []
        for category, row in batch:
            image = coco.images[int(coco.image_ids[row])]
            entry_rgb = out / POOL_DIR / str(category) / f"{int(coco.ann_ids[row])}.png"
            tasks.append(
                (
                    str(config.image_dir / image.file_name),
                    coco.segmentations[row],
                    tuple(coco.bboxes[row].tolist()),
                    image.width,
                    image.height,
                    str(entry_rgb),
                    str(entry_rgb.with_name(entry_rgb.stem + "_mask.png")),
                    [coco.segmentations[row_of[a]] for a in verdicts[row].subtracted],
                )
            )
        for (category, row), reason in zip(batch, run(_cut_reference, tasks), strict=True):
            image_id = int(coco.image_ids[row])
            if reason is not None:
                bad_images[image_id] = reason
                skipped.append({"ann_id": int(coco.ann_ids[row]), "image_id": image_id, "reason": reason})
                log.warning("reference candidate %d skipped: %s", int(coco.ann_ids[row]), reason)
                continue
            entry, verdict = coco.instance(row), verdicts[row]
            pools[category].append(
                PoolEntry(
                    entry.ann_id,
                    entry.image_id,
                    entry.category_id,
                    entry.bbox,
                    verdict.mask_area,
                    verdict.causes,
                    verdict.score,
                    verdict.subtracted,
                )  # fmt: skip
            )
            bar.update(1)
    bar.close()
    # Rounds walk each category's candidates in rank order, so every pool is already best first.
    skipped.sort(key=lambda s: s["ann_id"])
    return pools, skipped


def _load_pools(path: Path) -> tuple[dict[int, list[PoolEntry]], list[dict[str, Any]], dict[str, Any]]:
    data = json.loads(path.read_text())
    pools = {int(c): [PoolEntry.from_json(e) for e in entries] for c, entries in data["categories"].items()}
    return pools, data["skipped"], data["rule"]


# ---------------------------------------------------------------------------------------------------------- tuples


_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_IRREGULAR_PLURALS = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "skateboard": "skateboards",
}


def _plural(name: str) -> str:
    head, _, last = name.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "sh", "ch", "x")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def category_prompt(names: Iterable[str]) -> str:
    """Prompt for a scene without a caption, from its subjects' category names: 'a photo of two people and a dog'."""
    counts = Counter(names)
    parts = []
    for name in sorted(counts, key=lambda n: (-counts[n], n)):
        n = counts[name]
        if n == 1:
            parts.append(f"{'an' if name[0] in 'aeiou' else 'a'} {name}")
        else:
            parts.append(f"{_NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else n} {_plural(name)}")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"a photo of {listed}"


@functools.lru_cache(maxsize=256)
def load_reference(out: str, rgb_file: str, mask_file: str) -> tuple[np.ndarray, np.ndarray]:
    """A saved reference crop (RGB uint8) and its mask (bool), read from a build folder."""
    with Image.open(Path(out) / rgb_file) as rgb, Image.open(Path(out) / mask_file) as mask:
        return np.asarray(rgb.convert("RGB")), np.asarray(mask.convert("L")) > 127


def _make_tuple(task: dict[str, Any]) -> dict[str, Any]:
    """Check the target photo and render one scene's layout map; returns the manifest record or a skip record."""
    record = task["record"]
    _, reason = _open_rgb(Path(task["image_path"]), record["width"], record["height"])
    if reason:
        return {"skipped": {"image_id": record["image_id"], "file_name": record["file_name"], "reason": reason}}
    subjects = record["subjects"]
    placements = [None] * len(subjects)
    for subject in subjects:
        rgb, mask = load_reference(task["out"], subject["reference_file"], subject["reference_mask_file"])
        x, y, w, h = subject["bbox"]
        placements[subject["z_rank"]] = Placement(rgb=rgb, mask=mask, box=(x, y, x + w, y + h))
    layout_map, _ = compose_layout_map(record["width"], record["height"], placements)
    save_png_atomic(Path(task["out"]) / record["layout_map"], layout_map)
    return {"record": record}


def plan_scene(
    coco: CocoInstances,
    rows: np.ndarray,
    pools: dict[int, list[PoolEntry]],
    captions: dict[int, list[str]],
    seed: int,
) -> tuple[dict[str, Any] | None, str]:
    """Sample references and the prompt of one scene (Eq. 3-5). Returns (manifest record, '') or (None, reason).

    References are drawn without replacement within the scene: a random clean pool entry while the category has one
    left, else a random one among the entries the rule rejected with the fewest causes (recorded as
    ``reference_clean: false``)."""
    image_id = int(coco.image_ids[rows[0]])
    image = coco.images[image_id]
    rng = np.random.default_rng([seed, image_id])
    ann_ids = coco.ann_ids[rows].tolist()
    areas = coco.mask_areas[rows].tolist()
    z_rank = {index: rank for rank, index in enumerate(paint_order(areas, ann_ids))}
    used: set[int] = set()
    subjects = []
    for index, row in enumerate(rows.tolist()):
        category_id = int(coco.category_ids[row])
        pool = pools.get(category_id, [])
        # A reference is never the scene's own instance, nor any instance of the same photo, nor used twice in it.
        outside = [e for e in pool if e.image_id != image_id]
        eligible = [e for e in outside if e.ann_id not in used]
        name = coco.categories[category_id]
        if not outside:
            return None, f"no reference for category '{name}' outside this image (pool of {len(pool)})"
        if not eligible:
            wanted = sum(int(coco.category_ids[r]) == category_id for r in rows.tolist())
            return None, (
                f"{wanted} subjects of category '{name}' but only {len(outside)} references outside this image "
                f"(pool of {len(pool)}); a scene never gets the same reference twice"
            )
        clean = [e for e in eligible if e.clean]
        # Without a clean entry, a random one among the fallbacks with the fewest causes: always the best-ranked one
        # made a single fallback serve every subject of its category (on the train slice, one table 10 of 22 scenes).
        fewest = min(len(e.causes) for e in eligible)
        options = clean or [e for e in eligible if len(e.causes) == fewest]
        reference = options[int(rng.integers(len(options)))]
        used.add(reference.ann_id)
        subjects.append(
            {
                "ann_id": ann_ids[index],
                "category_id": category_id,
                "category": coco.categories[category_id],
                "bbox": coco.bboxes[row].tolist(),
                "mask_area": areas[index],
                "z_rank": z_rank[index],
                "reference_id": reference.ann_id,
                "reference_image_id": reference.image_id,
                "reference_clean": reference.clean,
                "reference_file": reference.file,
                "reference_mask_file": reference.mask_file,
            }
        )
    scene_captions = captions.get(image_id, [])
    if scene_captions:
        caption, source = scene_captions[int(rng.integers(len(scene_captions)))], "coco"
    else:
        caption, source = category_prompt(s["category"] for s in subjects), "categories"
    record = {
        "image_id": image_id,
        "file_name": image.file_name,
        "width": image.width,
        "height": image.height,
        "caption": caption,
        "caption_source": source,
        "layout_map": f"{LAYOUT_DIR}/{image_id:012d}.png",
        "subjects": subjects,
    }
    return record, ""


# ----------------------------------------------------------------------------------------------------------- stats


def compute_stats(
    config: BuildConfig,
    coco: CocoInstances,
    scenes_kept: int,
    salient_count: int,
    pools: dict[int, list[PoolEntry]],
    pool_skipped: list[dict[str, Any]],
    records: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    rule: dict[str, Any],
) -> dict[str, Any]:
    per_scene = Counter(len(r["subjects"]) for r in records)
    subjects = Counter(s["category_id"] for r in records for s in r["subjects"])
    fallback = Counter(s["category_id"] for r in records for s in r["subjects"] if not s["reference_clean"])
    scenes_with = Counter(c for r in records for c in {s["category_id"] for s in r["subjects"]})
    per_category = {}
    for category_id, name in sorted(coco.categories.items()):
        pool = pools.get(category_id, [])
        found = rule["per_category"][name]
        per_category[name] = {
            "category_id": category_id,
            "subjects": subjects[category_id],
            "subjects_with_rejected_reference": fallback[category_id],
            "scenes": scenes_with[category_id],
            "pool": len(pool),
            "pool_clean": sum(e.clean for e in pool),
            "candidates": found["candidates"],
            "clean_candidates": found["clean"],
            "rejected_candidates": found["rejected"],
            "rejected_by_cause": {cause: n for cause, n in found["causes"].items() if n},
        }
    causes = Counter()
    for found in rule["per_category"].values():
        causes.update(found["causes"])
    return {
        "config": config.identity(),
        "images": len(coco.images),
        "instances": len(coco),
        "crowd_instances": int(coco.iscrowd.sum()),
        "salient_instances": salient_count,
        "scenes_kept": scenes_kept,
        "scenes_written": len(records),
        "scenes_skipped": len(skipped),
        "subjects_written": sum(len(r["subjects"]) for r in records),
        "subjects_with_rejected_reference": sum(fallback.values()),
        "reference_rule": {
            "quality_version": rule["quality_version"],
            "candidates": sum(f["candidates"] for f in rule["per_category"].values()),
            "clean": sum(f["clean"] for f in rule["per_category"].values()),
            "rejected": sum(f["rejected"] for f in rule["per_category"].values()),
            "rejected_by_cause": {cause: causes[cause] for cause in MSI_CAUSES},
            "pool_references": sum(len(p) for p in pools.values()),
            "pool_clean": sum(e.clean for p in pools.values() for e in p),
        },
        "subjects_per_scene": {str(k): per_scene[k] for k in sorted(per_scene)},
        "captions": {
            "coco": sum(r["caption_source"] == "coco" for r in records),
            "categories": sum(r["caption_source"] == "categories" for r in records),
        },
        "per_category": per_category,
        "skipped": skipped,
        "pool_skipped": pool_skipped,
    }


# ----------------------------------------------------------------------------------------------------------- build


@contextlib.contextmanager
def _ordered_map(workers: int, close_fd: int | None = None) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered map over ``workers`` processes (in-process for 1).

    The parent's objects are frozen across the fork so the children's garbage collector never touches (and so never
    copies) the pages of the parsed annotations; the children need none of them, their tasks carry their data.
    ``close_fd`` (the build lock) is closed in the children, so a worker outliving a killed parent never holds it.
    """
    if workers <= 1:
        yield map
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    gc.collect()
    gc.freeze()
    try:
        if close_fd is not None and method == "fork":
            pool = mp.get_context(method).Pool(workers, initializer=_close_inherited, initargs=(close_fd,))
        else:
            pool = mp.get_context(method).Pool(workers)
    finally:
        gc.unfreeze()
    try:
        yield lambda fn, items: pool.imap(fn, items, chunksize=2)
    finally:
        pool.terminate()
        pool.join()


def _close_inherited(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def build_msi(config: BuildConfig, progress: bool = True) -> BuildSummary:
    """Build (or resume) the MSI dataset described by ``config`` into ``config.out``."""
    out = Path(config.out)
    config.identity()  # the annotation files exist (hashed here, cached): nothing is created before that
    if not config.image_dir.is_dir():
        raise FileNotFoundError(f"{config.image_dir}: the split's image folder is not in the COCO root")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_or_busy(
        out / ".build.lock", f"the MSI build in {out}", "wait for it to end or stop it, or build into another --out"
    ) as lock_fd:
        write_config = _check_config(config)
        remove_stale_temp_files([out, out / LAYOUT_DIR])
        remove_stale_temp_files([out / POOL_DIR], recursive=True)
        return _build(config, out, write_config, lock_fd, progress)


def _build(config: BuildConfig, out: Path, write_config: bool, lock_fd: int, progress: bool) -> BuildSummary:
    start = time.perf_counter()
    coco = load_instances(config.instances_file, workers=config.workers)
    captions = load_captions(config.captions_file)  # read before config.json too: a broken file claims no folder
    if write_config:  # the inputs are readable: from here on this folder holds this build
        _write_config(config)
    scenes = filter_scenes(coco, alpha=config.alpha, beta=config.beta)
    filter_seconds = time.perf_counter() - start
    log.info(
        "filter: %d of %d images kept (alpha=%d, beta=%g), %d salient instances, %.1f s",
        len(scenes.scenes),
        len(coco.images),
        config.alpha,
        config.beta,
        int(scenes.salient.sum()),
        filter_seconds,
    )

    pool_path = out / POOL_FILE
    _recheck_photos(config, out, coco)
    if pool_path.is_file():
        pools, pool_skipped, rule = _load_pools(pool_path)
    else:
        with _ordered_map(config.workers, lock_fd) as run:
            verdicts = assess_references(coco, config.image_dir, run, progress)
            pools, pool_skipped = build_pools(coco, config, run, progress, verdicts)
        rule = rule_summary(coco, verdicts)
        pool_json = {"categories": {str(c): [e.to_json() for e in entries] for c, entries in sorted(pools.items())}}
        write_json_atomic(pool_path, {**pool_json, "skipped": pool_skipped, "rule": rule})
    # Segmentations are only needed to cut references: free them before the scene workers fork.
    coco = dataclasses.replace(coco, segmentations=[])

    manifest_path, skipped_path = out / MANIFEST_FILE, out / SKIPPED_FILE
    done = {r["image_id"] for r in read_jsonl_committed(manifest_path)}
    done |= {r["image_id"] for r in read_jsonl_committed(skipped_path)}
    unknown = done - set(scenes.scenes)
    if unknown:
        raise ValueError(f"{manifest_path} lists image ids that this build does not keep, e.g. {min(unknown)}")
    remaining = [i for i in scenes.image_ids if i not in done]
    if done:
        log.info("resuming: %d scenes already done, %d to go", len(done), len(remaining))

    def tasks() -> Iterator[dict[str, Any]]:
        for image_id in remaining:
            record, reason = plan_scene(coco, scenes.scenes[image_id], pools, captions, config.seed)
            image = coco.images[image_id]
            if record is None:
                record = {"image_id": image_id, "file_name": image.file_name, "reason": reason}
            yield {"record": record, "image_path": str(config.image_dir / image.file_name), "out": str(out)}

    # Results come back in scene order, and each one is committed (a flushed line) before the next is read, so an
    # interrupted build leaves a prefix that the next run continues.
    with (
        _ordered_map(config.workers, lock_fd) as run,
        manifest_path.open("ab") as manifest,
        skipped_path.open("ab") as skipped_file,
    ):
        results = run(_plan_or_render, tasks())
        for result in tqdm(results, total=len(remaining), desc="scenes", disable=not progress, unit="scene"):
            if "skipped" in result:
                log.warning("scene %d skipped: %s", result["skipped"]["image_id"], result["skipped"]["reason"])
                skipped_file.write((json.dumps(result["skipped"]) + "\n").encode("utf-8"))
                skipped_file.flush()
            else:
                manifest.write((json.dumps(result["record"]) + "\n").encode("utf-8"))
                manifest.flush()

    records = read_jsonl_committed(manifest_path)
    skipped = read_jsonl_committed(skipped_path)
    stats = compute_stats(
        config, coco, len(scenes.scenes), int(scenes.salient.sum()), pools, pool_skipped, records, skipped, rule
    )
    write_json_atomic(out / STATS_FILE, stats)
    problems = sorted({str(r["reason"]) for r in [*pool_skipped, *skipped] if _photo_problem(r.get("reason"))})
    for problem in problems:
        log.warning("damaged photo left out: %s", problem)
    return BuildSummary(out, len(scenes.scenes), len(records), len(skipped), filter_seconds, tuple(problems))


def _plan_or_render(task: dict[str, Any]) -> dict[str, Any]:
    record = task["record"]
    if "reason" in record:
        return {"skipped": record}
    return _make_tuple(task)
