"""Where msibench keeps derived files (``$MSIBENCH_CACHE``, default ``~/.cache/msibench``), and how every file is
written: to a temp file in the target folder, then ``os.replace``d, with the permissions the umask gives a plain
``open()`` (0644 under the usual umask 022), never mkstemp's private 0600.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "MSIBENCH_CACHE"
TMP_SUFFIX = ".tmp"


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks: the one file hash of msibench, baselines and
    mscustomnet (source photos, references, images, weights, checkpoints, thumbnails)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CacheDirError(OSError):
    """``$MSIBENCH_CACHE`` (or its default) cannot be used as a folder; the message names it."""


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    path = Path(env) if env else Path.home() / ".cache" / "msibench"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        where = f"{CACHE_ENV}={env}" if env else f"the default cache {path} (set {CACHE_ENV} to choose another)"
        raise CacheDirError(f"{where}: cannot be used as the msibench cache folder: {err}") from err
    return path


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the set-and-restore dance (not thread-safe, so only as a fallback)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir()`` would give a new folder: 0o777 minus the umask."""
    return 0o777 & ~current_umask()


def mkstemp(dir: str | Path, prefix: str, suffix: str = TMP_SUFFIX) -> tuple[int, str]:
    """``tempfile.mkstemp`` whose file gets the umask's mode (mkstemp itself always makes 0600)."""
    fd, tmp = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, file_mode())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def mkdtemp(dir: str | Path, prefix: str, suffix: str = TMP_SUFFIX) -> str:
    """``tempfile.mkdtemp`` whose folder gets the umask's mode (mkdtemp itself always makes 0700)."""
    tmp = tempfile.mkdtemp(dir=dir, prefix=prefix, suffix=suffix)
    os.chmod(tmp, dir_mode())
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folders: Iterable[str | Path], recursive: bool = False) -> int:
    """Delete the temp files (hidden ``.*.tmp`` files and folders) that killed writers left in ``folders``.

    Only call it while holding the lock that every writer of these folders holds: a live writer's temp file looks
    exactly like a stale one. Returns how many were removed."""
    folders = [Path(f) for f in folders]
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.glob(f".*{TMP_SUFFIX}"):
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
    if removed:
        where = ", ".join(map(str, folders))
        logger.info("removed %d stale temp file(s) left by an interrupted writer in %s", removed, where)
    return removed
