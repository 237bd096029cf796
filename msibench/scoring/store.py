"""The score files of a run folder: ``scores.jsonl`` (one record per image) and ``scores.json`` (the header: scorer
version, packages, date, command and, once a pass ends, the aggregate summary).

Scoring a run whose ``scores.json`` has another scorer version is refused unless ``rescore=True``, which archives
the old files as ``scores-<old hash>.json[l]`` (nothing is lost) and starts afresh.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from msibench.cache import atomic_write_bytes
from msibench.records import locked, read_records
from msibench.scoring.scorer import ScoreConflictError, ScoreError

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
SCORES_HEADER = "scores.json"
SCORES_FORMAT = "msibench-scores"
RUN_FILE = "run.json"


def read_run_info(run_path: Path) -> dict[str, Any]:
    run_file = run_path / RUN_FILE
    if not run_file.is_file():
        raise ScoreError(f"{run_file}: not found; is {run_path} a run folder made by `msibench run`?")
    try:
        return json.loads(run_file.read_text())
    except json.JSONDecodeError as err:
        raise ScoreError(f"{run_file}: not valid JSON: {err}") from err


def open_scores(run_path, info, version, scorer_hash, device, rescore, argv) -> None:
    header_path = run_path / SCORES_HEADER
    with locked(run_path / ".scores.lock"):
        if header_path.is_file():
            try:
                header = json.loads(header_path.read_text())
            except json.JSONDecodeError as err:
                raise ScoreConflictError(f"{header_path}: unreadable ({err}); move it away or use --rescore") from err
            old = header.get("scorer_hash")
            if old == scorer_hash:
                return
            if not rescore:
                diff = _version_diff(header.get("scorer") or {}, version)
                raise ScoreConflictError(
                    f"{run_path} holds scores of scorer {old} ({diff}); this scorer is {scorer_hash}. "
                    "Use --rescore to archive them as scores-<hash>.json[l] and score again."
                )
            _archive(run_path, str(old))
        elif (run_path / SCORES_FILE).exists():
            if not rescore:
                raise ScoreConflictError(
                    f"{run_path / SCORES_FILE} exists without {SCORES_HEADER}; use --rescore to archive it"
                )
            _archive(run_path, "unknown")
        header = {
            "format": SCORES_FORMAT,
            "scorer_hash": scorer_hash,
            "scorer": version,
            "run": {
                "method": info.get("method"),
                "fingerprint_hash": info.get("fingerprint_hash"),
                "manifest_sha256": info.get("manifest_sha256"),
            },
            "packages": _package_versions(),
            "device": device,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": argv if argv is not None else sys.argv,
        }
        atomic_write_bytes(header_path, (json.dumps(header, indent=2, sort_keys=True) + "\n").encode())


def _version_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r:.80} -> {new.get(k)!r:.80}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "same settings, other hash"


def _archive(run_path: Path, old_hash: str) -> None:
    suffix = old_hash
    n = 1
    while (run_path / f"scores-{suffix}.jsonl").exists() or (run_path / f"scores-{suffix}.json").exists():
        n += 1
        suffix = f"{old_hash}.{n}"
    for name, new in ((SCORES_FILE, f"scores-{suffix}.jsonl"), (SCORES_HEADER, f"scores-{suffix}.json")):
        if (run_path / name).exists():
            (run_path / name).rename(run_path / new)
    logger.warning("%s: archived scores of scorer %s as scores-%s.json[l]", run_path, old_hash, suffix)


def finish_scores(run_path: Path, scorer_hash: str) -> None:
    """Store the aggregate of the current scores in scores.json (a convenience; tables recompute it)."""
    from msibench.scoring.aggregate import aggregate, summary_to_json

    header_path = run_path / SCORES_HEADER
    with locked(run_path / ".scores.lock"):
        header = json.loads(header_path.read_text())
        if header.get("scorer_hash") != scorer_hash:
            return
        records = [r for r in read_records(run_path / SCORES_FILE) if r.get("scorer") == scorer_hash]
        header["summary"] = summary_to_json(aggregate(records))
        header["counts"] = dict(Counter(str(r.get("status")) for r in records))
        atomic_write_bytes(header_path, (json.dumps(header, indent=2, sort_keys=True) + "\n").encode())


def load_scores(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(scores.json header, current score records) of a scored run folder."""
    run_path = Path(run_dir)
    header_path = run_path / SCORES_HEADER
    if not header_path.is_file():
        raise ScoreError(f"{header_path}: not found; score the run first with `msibench score {run_path}`")
    try:
        header = json.loads(header_path.read_text())
    except json.JSONDecodeError as err:
        raise ScoreError(f"{header_path}: not valid JSON: {err}") from err
    scorer_hash = header.get("scorer_hash")
    records = [r for r in read_records(run_path / SCORES_FILE) if r.get("scorer") == scorer_hash]
    return header, records


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (
        "msibench",
        "torch",
        "torchvision",
        "ultralytics",
        "open_clip_torch",
        "timm",
        "transformers",
        "scipy",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
