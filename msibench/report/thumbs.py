"""Thumbnails of generated images and references, made once and cached.

A thumbnail is keyed by the sha256 of the source file's bytes, its long-edge size and :data:`THUMB_VERSION`, so it
is made once per (content, size) whatever the path or the run it comes from. It lives in
``$MSIBENCH_CACHE/thumbs/`` and is copied into the report's ``assets/thumbs/``; a rebuilt report skips every
thumbnail it already holds. New thumbnails are made in a process pool (decoding the PNG dominates the cost).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from msibench.cache import cache_dir, sha256_file
from msibench.images import why_undecodable

logger = logging.getLogger(__name__)

# Bump when the way a thumbnail is made changes (filter, format, quality): it is part of every key.
THUMB_VERSION = "1"
THUMBS_DIR = "thumbs"
JPEG_QUALITY = 88


@dataclass(frozen=True)
class Thumb:
    """A thumbnail in a report: its path relative to the report folder and its pixel size."""

    rel: str
    width: int
    height: int


def thumb_name(sha256: str, size: int) -> str:
    return f"{sha256[:24]}-{size}-v{THUMB_VERSION}.jpg"


def make_thumbnail(source: str | Path, size: int) -> tuple[bytes, tuple[int, int]]:
    """(JPEG bytes, (width, height)) of ``source`` scaled so its long edge is at most ``size`` (never enlarged)."""
    import io

    from PIL import Image

    with Image.open(source) as im:
        im.draft("RGB", (size, size))  # JPEG sources decode at a reduced scale directly
        im = im.convert("RGB")
        # reducing_gap 1: integer factors are box-averaged (a 512² image to 256² is one 2x2 mean), the rest bicubic
        im.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=1.0)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
        return buf.getvalue(), im.size


def _write_cache_entry(path: str | Path, data: bytes) -> None:
    """Temp file + ``os.replace``, without fsync: a thumbnail is derived data, cheap to make again, and syncing
    each of a thousand small files would cost more than making them."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _make_into_cache(job: tuple[str, str, int, str]) -> tuple[str, int, int, str | None]:
    """(sha256, width, height, None), or (sha256, 0, 0, reason) when the source cannot be decoded: one damaged
    image is shown as such in its card, it does not stop the report. Writing the cache entry may still raise."""
    source, sha, size, cached = job
    try:
        data, (width, height) = make_thumbnail(source, size)
    except Exception as err:  # PIL raises many kinds for a damaged file (msibench.images)
        return sha, 0, 0, why_undecodable(err)
    _write_cache_entry(cached, data)
    return sha, width, height, None


def _jpeg_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


class ThumbnailStore:
    """Thumbnails for one report folder: ``add`` sources, then ``build`` makes the missing ones.

    ``workers`` processes make new thumbnails (default: the CPU count); 1 makes them in this process.
    """

    def __init__(self, out_dir: str | Path, size: int, workers: int | None = None) -> None:
        if size < 16:
            raise ValueError(f"thumbnail size must be at least 16 px, got {size}")
        self.out_dir = Path(out_dir)
        self.size = size
        self.workers = workers
        self._sources: dict[str, Path] = {}  # sha256 -> a source file with that content
        self._by_path: dict[Path, str] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self.errors: dict[str, str] = {}  # sha256 -> why no thumbnail could be made (the source does not decode)
        self.made = 0
        self.from_cache = 0
        self.present = 0

    @property
    def cache(self) -> Path:
        return cache_dir() / THUMBS_DIR

    def add(self, source: str | Path) -> str:
        """Register a source file; returns its sha256 (computed once per path)."""
        path = Path(source)
        sha = self._by_path.get(path)
        if sha is None:
            sha = sha256_file(path)
            self._by_path[path] = sha
            self._sources.setdefault(sha, path)
        return sha

    def rel(self, sha: str) -> str:
        return f"assets/{THUMBS_DIR}/{thumb_name(sha, self.size)}"

    def error(self, sha: str) -> str | None:
        """Why the source of ``sha`` has no thumbnail (it does not decode), or None."""
        return self.errors.get(sha)

    def thumb(self, sha: str) -> Thumb:
        w, h = self.sizes.get(sha, (self.size, self.size))
        return Thumb(self.rel(sha), w, h)

    def build(self, progress: bool = False) -> None:
        """Make every registered thumbnail that neither the report folder nor the cache holds yet."""
        dest_dir = self.out_dir / "assets" / THUMBS_DIR
        dest_dir.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        jobs = []
        for sha, source in self._sources.items():
            name = thumb_name(sha, self.size)
            dest, cached = dest_dir / name, self.cache / name
            if dest.is_file():
                self.present += 1
                self.sizes[sha] = _jpeg_size(dest.read_bytes())
            elif cached.is_file():
                shutil.copyfile(cached, dest)
                self.from_cache += 1
                self.sizes[sha] = _jpeg_size(dest.read_bytes())
            else:
                jobs.append((str(source), sha, self.size, str(cached)))
        for sha, w, h, error in self._run(jobs, progress):
            if error is not None:
                self.errors[sha] = error
                logger.warning("%s: cannot be read, shown as unreadable in the report (%s)", self._sources[sha], error)
                continue
            self.sizes[sha] = (w, h)
            name = thumb_name(sha, self.size)
            shutil.copyfile(self.cache / name, dest_dir / name)
            self.made += 1
        logger.info(
            "thumbnails: %d made, %d from the cache, %d already in the report",
            self.made,
            self.from_cache,
            self.present,
        )

    def _run(
        self, jobs: list[tuple[str, str, int, str]], progress: bool
    ) -> Iterable[tuple[str, int, int, str | None]]:
        from tqdm import tqdm

        workers = self.workers or os.cpu_count() or 1
        bar = tqdm(total=len(jobs), desc="thumbnails", unit="img", disable=not progress or not jobs, leave=False)
        try:
            if workers <= 1 or len(jobs) < 64:  # a pool costs more than it saves on a few images
                for job in jobs:
                    yield _make_into_cache(job)
                    bar.update(1)
                return
            chunk = max(1, min(32, len(jobs) // (workers * 4)))
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(_make_into_cache, jobs, chunksize=chunk):
                    yield result
                    bar.update(1)
        finally:
            bar.close()
