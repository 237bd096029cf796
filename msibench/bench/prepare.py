"""Materialize the manifest's references (white-background cut-outs + masks) into the cache.

Source images come from a local COCO root (``--coco-root`` / ``MSIBENCH_COCO_ROOT``) or, when none is given,
are downloaded from their ``coco_url`` into the cache. Every source file is checked against the manifest's
sha256 before it is used.

Each reference is three files: the cut-out, its mask, and ``<key>.json`` holding the sha256 of both, written last
(the commit marker). A reference counts as present only when both files match their recorded checksums; a
missing, truncated or altered one is cut out of COCO again. Writers hold the cache's lock, under which the temp
files of killed writers are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from msibench.bench.manifest import Manifest, Reference, Source
from msibench.cache import atomic_write_bytes, cache_dir, remove_stale_temp_files, sha256_file
from msibench.records import locked

logger = logging.getLogger(__name__)

# Bump when the way a reference is cut out changes: it is part of every reference's cache key.
MATERIALIZE_VERSION = "1"
COCO_ROOT_ENV = "MSIBENCH_COCO_ROOT"


class PrepareError(RuntimeError):
    """Benchmark data cannot be prepared; the message names the file and what to do."""


class ChecksumError(PrepareError):
    pass


@dataclass(frozen=True)
class ReferencePaths:
    image: Path
    mask: Path

    @property
    def checksums(self) -> Path:
        """``<key>.json``: the sha256 of the cut-out and the mask as written (the reference's commit marker)."""
        return self.image.with_suffix(".json")


def references_dir() -> Path:
    return cache_dir() / "references"


def reference_key(ref: Reference, source: Source) -> str:
    """Cache key of a materialized reference: everything that changes its pixels."""
    spec = {
        "v": MATERIALIZE_VERSION,
        "source_sha256": source.sha256,
        "annotation_id": ref.annotation_id,
        "crop": list(ref.crop),
        "segmentation": ref.segmentation,
    }
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return f"{ref.annotation_id}-{hashlib.sha256(blob).hexdigest()[:16]}"


def reference_paths(ref: Reference, source: Source) -> ReferencePaths:
    key = reference_key(ref, source)
    base = references_dir()
    return ReferencePaths(image=base / f"{key}.png", mask=base / f"{key}.mask.png")


def resolve_coco_root(coco_root: str | Path | None) -> Path | None:
    root = coco_root or os.environ.get(COCO_ROOT_ENV)
    if not root:
        return None
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(f"COCO root {root} does not exist")
    return root


def reference_problem(paths: ReferencePaths) -> str | None:
    """Why a cached reference cannot be used (missing, no checksum record, altered), or None when it is intact."""
    try:
        recorded = json.loads(paths.checksums.read_text())
        expected = {"image": recorded["image"], "mask": recorded["mask"]}
    except FileNotFoundError:
        return "missing" if not paths.image.exists() else "no checksum recorded"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"checksum record unreadable ({type(err).__name__})"
    for part, path in (("image", paths.image), ("mask", paths.mask)):
        try:
            actual = sha256_file(path)
        except OSError:
            return f"{part} file missing"
        if actual != expected[part]:
            return f"{part} file altered (sha256 {actual[:12]}, recorded {str(expected[part])[:12]})"
    return None


def missing_references(manifest: Manifest, tasks=None) -> list[tuple[Reference, Source]]:
    """The references of ``tasks`` (default: all) that are not in the cache intact (see :func:`reference_problem`)."""
    return [(ref, source) for ref, source, _ in damaged_references(manifest, tasks)]


def damaged_references(manifest: Manifest, tasks=None) -> list[tuple[Reference, Source, str]]:
    out = []
    seen: set[Path] = set()
    for task in tasks if tasks is not None else manifest.tasks:
        for subject in task.subjects:
            source = manifest.sources[subject.reference.image_id]
            paths = reference_paths(subject.reference, source)
            if paths.image in seen:
                continue
            seen.add(paths.image)
            problem = reference_problem(paths)
            if problem is not None:
                out.append((subject.reference, source, problem))
    return out


def prepare(manifest: Manifest, coco_root: str | Path | None = None, tasks=None, verify_all: bool = True) -> int:
    """Make sure every reference of ``tasks`` (default: all) is in the cache; return how many were written.

    With ``verify_all`` every source file is checked against its sha256 even when its references are cached.
    """
    root = resolve_coco_root(coco_root)
    tasks = list(tasks) if tasks is not None else list(manifest.tasks)
    folder = references_dir()
    with locked(folder / ".prepare.lock"):
        remove_stale_temp_files([folder])
        remove_stale_temp_files([cache_dir() / "coco"], recursive=True)
        todo = damaged_references(manifest, tasks)
        rebuilt = [(ref.annotation_id, problem) for ref, _, problem in todo if problem != "missing"]
        for annotation_id, problem in rebuilt:
            logger.warning("reference of annotation %d: %s; cutting it out of COCO again", annotation_id, problem)
        needed = {s.image_id: s for t in tasks for s in (manifest.sources[x.reference.image_id] for x in t.subjects)}
        to_check = needed if verify_all else {src.image_id: src for _, src, _ in todo}
        verified: dict[int, Path] = {}
        for image_id in sorted(to_check):
            verified[image_id] = _source_file(to_check[image_id], root)
        for ref, source, _ in todo:
            _materialize(ref, source, verified[source.image_id])
    logger.info(
        "prepared %d references (%d of them damaged before); %d source files verified",
        len(todo),
        len(rebuilt),
        len(verified),
    )
    return len(todo)


def _source_file(source: Source, root: Path | None) -> Path:
    if root is not None:
        path = root / source.split / source.file_name
        if not path.is_file():
            raise PrepareError(
                f"{path}: source image {source.image_id} not found under the COCO root {root} "
                f"(expected {source.split}/{source.file_name})"
            )
    else:
        path = cache_dir() / "coco" / source.split / source.file_name
        if not path.is_file():
            _download(source, path)
    actual = sha256_file(path)
    if actual != source.sha256:
        raise ChecksumError(
            f"{path}: sha256 {actual} does not match the manifest ({source.sha256}) for COCO image "
            f"{source.image_id}; the file is corrupt or not the COCO 2017 original{_unconfirmed_note(source)}"
        )
    return path


def _unconfirmed_note(source: Source) -> str:
    if source.bytes_confirmed:
        return ""
    return (
        f". Photo {source.image_id} is one whose pinned bytes no second source confirmed when the manifest was built "
        "(docs/benchmark.md lists them): if your copy is the COCO original, the pinned copy was not; please report it"
    )


def _download(source: Source, path: Path) -> None:
    logger.info("downloading %s", source.coco_url)
    try:
        with urllib.request.urlopen(source.coco_url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise PrepareError(
            f"cannot download COCO image {source.image_id} from {source.coco_url} ({err}). Offline? Pass "
            f"--coco-root DIR (or set {COCO_ROOT_ENV}) to a COCO 2017 folder holding {source.split}/"
        ) from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != source.sha256:
        raise ChecksumError(
            f"COCO image {source.image_id} ({source.split}/{source.file_name}) downloaded from {source.coco_url} has "
            f"sha256 {actual}, the manifest pins {source.sha256}; nothing was written{_unconfirmed_note(source)}"
        )
    atomic_write_bytes(path, data)


def cut_out(image, segmentation, crop: tuple[int, int, int, int]):
    """(RGB cut-out with white outside the mask, L mask) of ``crop`` of ``image``."""
    import numpy as np
    from PIL import Image

    from msibench.coco import decode_mask

    rgb = np.asarray(image.convert("RGB"))
    mask = decode_mask(segmentation, rgb.shape[0], rgb.shape[1]).astype(bool)
    x0, y0, x1, y1 = crop
    patch = rgb[y0:y1, x0:x1].copy()
    inside = mask[y0:y1, x0:x1]
    patch[~inside] = 255
    return Image.fromarray(patch, "RGB"), Image.fromarray(inside.astype(np.uint8) * 255, "L")


def _materialize(ref: Reference, source: Source, path: Path) -> None:
    from PIL import Image

    paths = reference_paths(ref, source)
    with Image.open(path) as image:
        if image.size != (source.width, source.height):
            raise PrepareError(f"{path}: size {image.size} differs from the manifest's {source.width}x{source.height}")
        cutout, mask = cut_out(image, ref.segmentation, ref.crop)
    checksums = {}
    for part, img, target in (("mask", mask, paths.mask), ("image", cutout, paths.image)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(target, buf.getvalue())
        checksums[part] = hashlib.sha256(buf.getvalue()).hexdigest()
    blob = json.dumps({**checksums, "v": MATERIALIZE_VERSION}, sort_keys=True, indent=1) + "\n"
    atomic_write_bytes(paths.checksums, blob.encode())
