"""MSIBench manifest: the benchmark definition as data, its typed view and its validation.

The manifest is one JSON file. It pins, for every source image, the COCO image id, file name, split,
``coco_url`` and sha256, and for every task the subjects' categories, boxes (normalized to the square
output canvas), z-order and the exact reference instance (annotation id, pixel crop, segmentation), so the
references can be materialized from a COCO download alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from msibench.coco import CATEGORY_ID, CATEGORY_NAME

MANIFEST_FORMAT = "msibench-manifest"
# Manifests shipped in the package, loadable by name (``--manifest v1``). v1 (builder 1): references ranked by
# border and mask area only; v2 (builder 2, from the 158-photo coco2017-mini slice): references from the
# reference-quality rule + hand review; v3 (builder 3, the default, from the 212-photo coco2017-val-plus): more
# photos, every pool member reviewed beside its photo, contained instances kept in the cut-out, and balanced use
# (at most 8 subjects per reference, no two references of a task from one photo). Scores of versions differ.
PACKAGED_MANIFESTS = {"v1": "msibench_v1.json", "v2": "msibench_v2.json", "v3": "msibench_v3.json"}
DEFAULT_MANIFEST = "v3"
DEFAULT_MANIFEST_NAME = PACKAGED_MANIFESTS[DEFAULT_MANIFEST]
TRACKS = ("single", "multi")


class ManifestError(ValueError):
    """A manifest that does not follow the schema; the message names the file, task and field."""


@dataclass(frozen=True)
class Source:
    image_id: int
    split: str
    file_name: str
    coco_url: str
    sha256: str
    width: int
    height: int
    # False for a photo whose pinned bytes no second source confirmed when the manifest was built (v3 marks them;
    # older manifests have no such field, so every source counts as confirmed).
    bytes_confirmed: bool = True


@dataclass(frozen=True)
class Reference:
    """A reference instance: its pixels are ``crop`` (x0, y0, x1, y1, integer pixels) of the source image,
    with everything outside ``segmentation`` (COCO polygons or RLE) set to white."""

    image_id: int
    annotation_id: int
    crop: tuple[int, int, int, int]
    segmentation: Any
    mask_area: float
    touches_border: bool

    @property
    def size(self) -> tuple[int, int]:
        return (self.crop[2] - self.crop[0], self.crop[3] - self.crop[1])


@dataclass(frozen=True)
class Subject:
    category: str
    category_id: int
    box: tuple[float, float, float, float]
    z: int
    scene_annotation_id: int | None
    scene_mask_area: float | None
    reference: Reference


@dataclass(frozen=True)
class Task:
    id: str
    track: str
    prompt: str
    background: str
    scene_image_id: int | None
    scene_caption: str | None
    subjects: tuple[Subject, ...]

    @property
    def k(self) -> int:
        return len(self.subjects)

    def subjects_back_to_front(self) -> list[Subject]:
        return sorted(self.subjects, key=lambda s: s.z)


@dataclass(frozen=True)
class Manifest:
    path: str
    version: str
    sha256: str
    build: dict[str, Any]
    sources: dict[int, Source]
    tasks: tuple[Task, ...]
    # The packaged name ("v1", "v2") when the file's bytes are a packaged manifest's, else the file name.
    name: str = ""

    @cached_property
    def by_id(self) -> dict[str, Task]:
        return {t.id: t for t in self.tasks}

    def select(self, track: str = "all", limit: int | None = None) -> list[Task]:
        """The tasks of ``track`` (or all), in manifest order; ``limit``: at most that many per track, a sample
        stratified over the subject count K (see :func:`stratified_by_k`)."""
        if track not in (*TRACKS, "all"):
            raise ValueError(f"unknown track {track!r}; choose single, multi or all")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive number of tasks per track, got {limit!r}")
        if limit is None:
            return [t for t in self.tasks if track == "all" or t.track == track]
        chosen = {
            t.id
            for tr in TRACKS
            if track in ("all", tr)
            for t in stratified_by_k([x for x in self.tasks if x.track == tr], limit)
        }
        return [t for t in self.tasks if t.id in chosen]


def stratified_by_k(tasks: list[Task], limit: int) -> list[Task]:
    """At most ``limit`` of ``tasks``, spread over their subject counts: K groups take turns (smallest K first),
    each giving its next task in manifest order. ``--limit 4`` on the multi track is one task of each K = 2..5,
    ``--limit 6`` two of K = 2 and 3 and one of K = 4 and 5. Deterministic: the first tasks of each K."""
    groups: dict[int, list[Task]] = {}
    for task in tasks:
        groups.setdefault(task.k, []).append(task)
    chosen: list[Task] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(g) for g in groups.values()):
        for k in sorted(groups):
            if depth < len(groups[k]) and len(chosen) < limit:
                chosen.append(groups[k][depth])
        depth += 1
    return chosen


def packaged_manifest_path(name: str) -> Path:
    if name not in PACKAGED_MANIFESTS:
        raise ManifestError(f"unknown manifest name {name!r}; packaged: {', '.join(PACKAGED_MANIFESTS)}")
    return Path(str(resources.files("msibench") / "data" / PACKAGED_MANIFESTS[name]))


def default_manifest_path() -> Path:
    return packaged_manifest_path(DEFAULT_MANIFEST)


def resolve_manifest_path(spec: str | Path | None) -> Path:
    """A manifest file from ``--manifest``: None is the default (v3); an existing file is itself; otherwise a packaged
    name (``v1``, ``v2``, ``v3``) is that packaged manifest."""
    if spec is None:
        return default_manifest_path()
    path = Path(spec)
    if not path.is_file() and str(spec) in PACKAGED_MANIFESTS:
        return packaged_manifest_path(str(spec))
    return path


def _packaged_name(sha256: str) -> str | None:
    for name in PACKAGED_MANIFESTS:
        path = packaged_manifest_path(name)
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return name
    return None


def dumps(manifest: dict[str, Any]) -> bytes:
    """Canonical bytes of a manifest dict: the same content always gives the same bytes."""
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


# The copy of its manifest that every run folder keeps (its sha256 is run.json's manifest_sha256), so a run made from
# a custom manifest stays usable when that file moves or the folder is copied to another machine.
RUN_MANIFEST_COPY = "manifest.json"


def keep_manifest_copy(folder: str | Path, manifest: Manifest) -> bool:
    """Write ``folder/manifest.json``, a byte copy of ``manifest``'s file, unless an identical copy is there; False
    (nothing written) when the manifest's file no longer holds the bytes it was loaded from."""
    from msibench.cache import atomic_write_bytes

    dest = Path(folder) / RUN_MANIFEST_COPY
    try:
        if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == manifest.sha256:
            return True
        blob = Path(manifest.path).read_bytes()
    except OSError:
        return False
    if hashlib.sha256(blob).hexdigest() != manifest.sha256:
        return False
    atomic_write_bytes(dest, blob)
    return True


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Load and validate a manifest: a file, or a packaged name (``v1``, ``v2``, ``v3``); the packaged v3 by
    default."""
    path = resolve_manifest_path(path)
    try:
        blob = path.read_bytes()
    except OSError as err:
        known = ", ".join(PACKAGED_MANIFESTS)
        raise ManifestError(f"{path}: cannot read manifest ({err}); packaged manifests by name: {known}") from err
    try:
        raw = json.loads(blob)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON: {err}") from err
    sha256 = hashlib.sha256(blob).hexdigest()
    manifest = parse_manifest(raw, str(path), sha256)
    return dataclasses.replace(manifest, name=_packaged_name(sha256) or path.name)


class _Checker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, message: str) -> ManifestError:
        return ManifestError(f"{self.where}: field {field!r}: {message}")

    def get(self, obj: dict[str, Any], key: str, types: type | tuple[type, ...], prefix: str = "") -> Any:
        name = f"{prefix}{key}"
        if not isinstance(obj, dict):
            raise self.fail(prefix.rstrip(".") or "<root>", f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            raise self.fail(name, "missing")
        value = obj[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.fail(name, f"expected {_type_names(types)}, got bool")
        if not isinstance(value, types):
            raise self.fail(name, f"expected {_type_names(types)}, got {type(value).__name__} {value!r:.60}")
        return value


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def parse_manifest(raw: Any, path: str, sha256: str) -> Manifest:
    top = _Checker(path)
    if not isinstance(raw, dict):
        raise top.fail("<root>", "expected a JSON object")
    fmt = top.get(raw, "format", str)
    if fmt != MANIFEST_FORMAT:
        raise top.fail("format", f"expected {MANIFEST_FORMAT!r}, got {fmt!r}")
    version = top.get(raw, "version", str)
    build = top.get(raw, "build", dict)

    sources: dict[int, Source] = {}
    for i, src in enumerate(top.get(raw, "sources", list)):
        chk = _Checker(f"{path}: sources[{i}]")
        sha = chk.get(src, "sha256", str)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise chk.fail("sha256", f"expected 64 lowercase hex digits, got {sha!r}")
        source = Source(
            image_id=chk.get(src, "image_id", int),
            split=chk.get(src, "split", str),
            file_name=chk.get(src, "file_name", str),
            coco_url=chk.get(src, "coco_url", str),
            sha256=sha,
            width=chk.get(src, "width", int),
            height=chk.get(src, "height", int),
            bytes_confirmed=chk.get(src, "bytes_confirmed", bool) if "bytes_confirmed" in src else True,
        )
        sources[source.image_id] = source

    tasks: list[Task] = []
    seen: set[str] = set()
    raw_tasks = top.get(raw, "tasks", list)
    if not raw_tasks:
        raise top.fail("tasks", "empty: a manifest needs at least one task")
    for i, raw_task in enumerate(raw_tasks):
        task_id = raw_task.get("id") if isinstance(raw_task, dict) else None
        chk = _Checker(f"{path}: task {task_id!r}" if isinstance(task_id, str) else f"{path}: tasks[{i}]")
        task = _parse_task(raw_task, chk, sources)
        if task.id in seen:
            raise chk.fail("id", "duplicate task id")
        seen.add(task.id)
        tasks.append(task)
    return Manifest(path=path, version=version, sha256=sha256, build=build, sources=sources, tasks=tuple(tasks))


def _parse_task(raw: Any, chk: _Checker, sources: dict[int, Source]) -> Task:
    task_id = chk.get(raw, "id", str)
    track = chk.get(raw, "track", str)
    if track not in TRACKS:
        raise chk.fail("track", f"expected one of {TRACKS}, got {track!r}")
    prompt = chk.get(raw, "prompt", str)
    background = chk.get(raw, "background", str)
    if not prompt.strip():
        raise chk.fail("prompt", "empty")
    scene = chk.get(raw, "scene", dict)
    scene_image_id = scene.get("image_id")
    scene_caption = scene.get("caption")
    if scene_image_id is not None and not isinstance(scene_image_id, int):
        raise chk.fail("scene.image_id", f"expected int or null, got {scene_image_id!r}")
    if scene_caption is not None and not isinstance(scene_caption, str):
        raise chk.fail("scene.caption", f"expected str or null, got {scene_caption!r}")
    raw_subjects = chk.get(raw, "subjects", list)
    if not raw_subjects:
        raise chk.fail("subjects", "a task needs at least one subject")
    if track == "single" and len(raw_subjects) != 1:
        raise chk.fail("subjects", f"a single-subject task has exactly 1 subject, got {len(raw_subjects)}")
    subjects = []
    for j, sub in enumerate(raw_subjects):
        p = f"subjects[{j}]."
        box = chk.get(sub, "box", list, p)
        if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise chk.fail(f"{p}box", f"expected 4 numbers, got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise chk.fail(f"{p}box", f"expected 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box!r}")
        ref = chk.get(sub, "reference", dict, p)
        rp = f"{p}reference."
        ref_image = chk.get(ref, "image_id", int, rp)
        if ref_image not in sources:
            raise chk.fail(f"{rp}image_id", f"image {ref_image} is not listed in sources")
        crop = chk.get(ref, "crop", list, rp)
        src = sources[ref_image]
        if (
            len(crop) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in crop)
            or not (0 <= crop[0] < crop[2] <= src.width and 0 <= crop[1] < crop[3] <= src.height)
        ):
            raise chk.fail(f"{rp}crop", f"expected integer x0<x1, y0<y1 inside {src.width}x{src.height}, got {crop!r}")
        segmentation = chk.get(ref, "segmentation", (list, dict), rp)
        if ref_image == raw.get("scene", {}).get("image_id"):
            raise chk.fail(f"{rp}image_id", "a reference must come from another image than the scene")
        reference = Reference(
            image_id=ref_image,
            annotation_id=chk.get(ref, "annotation_id", int, rp),
            crop=tuple(crop),  # type: ignore[arg-type]
            segmentation=segmentation,
            mask_area=float(chk.get(ref, "mask_area", (int, float), rp)),
            touches_border=chk.get(ref, "touches_border", bool, rp),
        )
        scene_ann = sub.get("scene_annotation_id")
        scene_area = sub.get("scene_mask_area")
        category, category_id = chk.get(sub, "category", str, p), chk.get(sub, "category_id", int, p)
        if category not in CATEGORY_ID:
            raise chk.fail(f"{p}category", f"{category!r} is not a COCO-80 category name")
        if category_id not in CATEGORY_NAME:
            raise chk.fail(f"{p}category_id", f"{category_id} is not a COCO-80 category id")
        if CATEGORY_ID[category] != category_id:
            raise chk.fail(
                f"{p}category_id",
                f"{category_id} is {CATEGORY_NAME[category_id]!r}, not {category!r} (id {CATEGORY_ID[category]})",
            )
        subjects.append(
            Subject(
                category=category,
                category_id=category_id,
                box=(x0, y0, x1, y1),
                z=chk.get(sub, "z", int, p),
                scene_annotation_id=scene_ann if isinstance(scene_ann, int) else None,
                scene_mask_area=float(scene_area) if isinstance(scene_area, (int, float)) else None,
                reference=reference,
            )
        )
    zs = sorted(s.z for s in subjects)
    if zs != list(range(len(subjects))):
        raise chk.fail("subjects[].z", f"z ranks must be 0..{len(subjects) - 1} once each, got {zs}")
    return Task(
        id=task_id,
        track=track,
        prompt=prompt,
        background=background,
        scene_image_id=scene_image_id,
        scene_caption=scene_caption,
        subjects=tuple(subjects),
    )


def manifest_info(manifest: Manifest) -> str:
    """``msibench bench info``: tasks, categories, scenes and references per track and K, and the reference pools."""
    from statistics import median

    where = (
        f"msibench/data/{PACKAGED_MANIFESTS[manifest.name]}" if manifest.name in PACKAGED_MANIFESTS else manifest.path
    )
    lines = [
        where,
        f"name {manifest.name}, version {manifest.version}, sha256 {manifest.sha256}",
        f"{'track':<7}{'K':>3}{'tasks':>7}{'categories':>12}{'scenes':>8}{'references':>12}",
    ]

    def row(label: str, k: str, tasks: list[Task]) -> str:
        cats = {s.category for t in tasks for s in t.subjects}
        scenes = {t.scene_image_id for t in tasks if t.scene_image_id is not None}
        refs = {s.reference.annotation_id for t in tasks for s in t.subjects}
        return f"{label:<7}{k:>3}{len(tasks):>7}{len(cats):>12}{len(scenes):>8}{len(refs):>12}"

    groups: dict[tuple[str, int], list[Task]] = {}
    for task in manifest.tasks:
        groups.setdefault((task.track, task.k), []).append(task)
    for track in TRACKS[::-1]:
        keys = sorted(k for k in groups if k[0] == track)
        for key in keys:
            lines.append(row(track, str(key[1]), groups[key]))
        if len(keys) > 1:
            lines.append(row(track, "all", [t for key in keys for t in groups[key]]))
    lines.append(row("all", "", list(manifest.tasks)))
    unconfirmed = sorted(i for i, src in manifest.sources.items() if not src.bytes_confirmed)
    lines.append(
        f"source images: {len(manifest.sources)}"
        + (f" ({len(unconfirmed)} whose bytes no second source confirms: {', '.join(map(str, unconfirmed))})"
           if unconfirmed else "")
    )  # fmt: skip
    uses: dict[int, int] = {}
    for task in manifest.tasks:
        for subject in task.subjects:
            uses[subject.reference.annotation_id] = uses.get(subject.reference.annotation_id, 0) + 1
    lines.append(
        f"uses per reference: max {max(uses.values())}, mean {sum(uses.values()) / len(uses):.2f} "
        f"({sum(uses.values())} subjects, {len(uses)} references)"
    )
    build = manifest.build
    pools = build.get("pools")
    if pools:
        sizes = [len(v) for v in pools.values()]
        lines.append(
            f"reference pools: {len(pools)} categories, {sum(sizes)} references ({min(sizes)}-{max(sizes)} per "
            f"category, median {median(sizes):g})"
        )
    refs = build.get("stats", {}).get("references")
    if refs:
        causes = ", ".join(f"{c} {n}" for c, n in refs["rejected_by_rule"].items())
        lines.append(
            f"reference candidates: {refs['candidates']} non-crowd instances, {refs['clean']} pass the rule "
            f"(rejections by cause, one instance may have several: {causes}); {refs['rejected_by_review']} more "
            f"rejected by the hand review; {refs['pool_unreviewed']} pool references unreviewed"
        )
    for track in TRACKS:
        stats = build.get("stats", {}).get(track, {})
        if "requested" in stats and stats["requested"] != stats["tasks"]:
            lines.append(f"{track}: {stats['tasks']} of {stats['requested']} requested tasks (all the data allows)")
    return "\n".join(lines)
