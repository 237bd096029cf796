"""Per-image records: one JSON object per line in ``records.jsonl``; the record is the commit marker.

Also the locks that keep concurrent writers of one folder apart (all advisory ``flock`` locks, released by the
kernel when their holder dies, so a SIGKILL never leaves a folder locked):

- :func:`locked`: a short critical section (append a line, rewrite a header); waits.
- :func:`exclusive_or_busy`: one writer of a thing at a time (a shard of a run, a scoring pass, an MSI build); a
  second one is refused at once with :class:`LockBusyError`, which names the holder.
- :class:`FolderWriters`: held shared by every process that writes into a folder, exclusively by one that is
  alone there; only a writer alone in a folder may delete what others could be writing (stale temp files).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
WRITERS_LOCK = ".writers.lock"


class LockBusyError(RuntimeError):
    """Another live process holds a lock this one needs (a second writer of the same shard, scoring pass or
    build); the message names the holder and what to do."""


def record_key(record: dict[str, Any]) -> tuple[str, int]:
    return (record["task_id"], int(record["sample_index"]))


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed); waits for it. Shards of one run serialize on it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def exclusive_or_busy(path: str | Path, what: str, advice: str) -> Iterator[int]:
    """Hold an exclusive lock on ``path`` for the whole block (yields the lock file's descriptor), or raise
    :class:`LockBusyError` at once when a live process holds it. The holder writes who it is into the file, so the
    refusal can name it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise LockBusyError(f"{what} is being written by {holder} (lock {path}); {advice}") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n")
            f.flush()
            yield f.fileno()
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class FolderWriters:
    """Membership of the writers of one folder: a shared lock on ``.writers.lock`` held by each of them.

    ``enter()`` takes the lock exclusively when nobody else writes there (``alone`` is then True: the caller may
    remove stale temp files or replace the folder's contents) and must call :meth:`share` when done with that; else
    it waits for a shared lock (an exclusive holder only keeps it for such a short clean-up)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / WRITERS_LOCK
        self._file = None
        self.alone = False

    def enter(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115 (held until close())
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.alone = True
        except BlockingIOError:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_SH)
            self.alone = False
        return self.alone

    def share(self) -> None:
        """Let other writers in (turn the exclusive lock into a shared one)."""
        if self._file is not None and self.alone:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_SH)
            self.alone = False

    def wait_alone(self) -> None:
        """Wait until every other writer of the folder has left."""
        if self._file is not None and not self.alone:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            self.alone = True

    def close(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            self.alone = False

    def __enter__(self) -> FolderWriters:
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _append_locked(f, path: Path, line: bytes) -> None:
    size = f.seek(0, os.SEEK_END)
    if size:
        # A process killed mid-write can leave a partial last line; start ours on a fresh line.
        with open(path, "rb") as r:
            r.seek(size - 1)
            if r.read(1) != b"\n":
                line = b"\n" + line
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record line and flush it to disk, under a lock so concurrent shards never interleave."""
    path = Path(path)
    with open(path, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            _append_locked(f, path, _encode(record))
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _parse_lines(data: bytes, where: Path, first_lineno: int = 1) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(data.split(b"\n"), first_lineno):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            record_key(rec)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s:%d: skipping an unreadable record line", where, lineno)
            continue
        records.append(rec)
    return records


def latest_by_key(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in records:
        latest[record_key(rec)] = rec
    return list(latest.values())


def read_records(path: str | Path, latest_only: bool = True) -> list[dict[str, Any]]:
    """Records of a ``records.jsonl`` (or a run folder). Unparsable lines (a torn write) are skipped with a
    warning. With ``latest_only`` a (task, sample) that was recorded again keeps its last record."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.exists():
        return []
    records = _parse_lines(path.read_bytes(), path)
    return latest_by_key(records) if latest_only else records


class RecordLog:
    """A ``records.jsonl`` that several processes append to, seen from one of them.

    :meth:`read` takes a snapshot; :meth:`append` then writes a record unless another writer recorded the same
    (task, sample) after that snapshot (two writers whose selections overlap, e.g. ``--shard 0/2`` beside
    ``--shard 0/1``): each unit is recorded once whatever runs beside it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offset = 0

    def read(self) -> list[dict[str, Any]]:
        """Every record (the latest per unit); later appends only watch what others write after this point."""
        if not self.path.exists():
            self._offset = 0
            return []
        data = self.path.read_bytes()
        self._offset = data.rfind(b"\n") + 1
        return latest_by_key(_parse_lines(data[: self._offset], self.path))

    def append(self, record: dict[str, Any]) -> bool:
        """Append ``record``; False (nothing written) when another writer recorded its unit since our snapshot."""
        key = record_key(record)
        with open(self.path, "ab") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                size = f.seek(0, os.SEEK_END)
                if size > self._offset:
                    with open(self.path, "rb") as r:
                        r.seek(self._offset)
                        fresh = r.read(size - self._offset)
                    complete = fresh[: fresh.rfind(b"\n") + 1]
                    if any(record_key(rec) == key for rec in _parse_lines(complete, self.path)):
                        self._offset = size
                        return False
                _append_locked(f, self.path, _encode(record))
                self._offset = f.tell()
                return True
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
