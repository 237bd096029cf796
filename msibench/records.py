"""Per-image records: one JSON object per line in ``records.jsonl``; the record is the commit marker."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"


def record_key(record: dict[str, Any]) -> tuple[str, int]:
    return (record["task_id"], int(record["sample_index"]))


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed); shards of one run serialize on it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record line and flush it to disk, under a lock so concurrent shards never interleave."""
    line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    path = Path(path)
    with open(path, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
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
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_records(path: str | Path, latest_only: bool = True) -> list[dict[str, Any]]:
    """Records of a ``records.jsonl`` (or a run folder). Unparsable lines (a torn write) are skipped with a
    warning. With ``latest_only`` a (task, sample) that was recorded again keeps its last record."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                record_key(rec)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                logger.warning("%s:%d: skipping an unreadable record line", path, lineno)
                continue
            records.append(rec)
    if not latest_only:
        return records
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in records:
        latest[record_key(rec)] = rec
    return list(latest.values())
