"""The score files of a run folder: ``scores.jsonl`` (one record per image) and ``scores.json`` (the header: scorer
version, packages, date, command and, once a pass ends, the aggregate summary).

Scoring a run whose ``scores.json`` has another scorer version, or was written for another generation run (another
method fingerprint, manifest or base seed than ``run.json`` now holds), is refused unless ``rescore=True``, which
archives the old files as ``scores-<old hash>.json[l]`` (nothing is lost) and starts afresh. Readers
(:func:`load_scored_run`) refuse such scores too, and only use score records that match the run's current
generation records: same unit, same fingerprint, same image sha256.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import sys
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from msibench.bench.manifest import (
    PACKAGED_MANIFESTS,
    RUN_MANIFEST_COPY,
    TRACKS,
    Manifest,
    ManifestError,
    load_manifest,
)
from msibench.cache import atomic_write_bytes
from msibench.records import RECORDS_FILE, locked, read_records, record_key
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


# What identifies the generation run that scores belong to (copied from run.json into scores.json).
RUN_IDENTITY = ("method", "fingerprint_hash", "manifest_sha256", "base_seed")


def run_identity(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info.get(k) for k in RUN_IDENTITY}


def _run_mismatch(header: dict[str, Any], info: dict[str, Any]) -> str | None:
    """How the run that ``header``'s scores were made from differs from the run in ``run.json`` (None: the same).
    Keys the header does not hold (scores written before base_seed was recorded) are not compared."""
    scored = header.get("run") or {}
    current = run_identity(info)
    diffs = [f"{k}: {scored[k]!r} -> {current[k]!r}" for k in RUN_IDENTITY if k in scored and scored[k] != current[k]]
    return ", ".join(diffs) or None


def open_scores(run_path, info, version, scorer_hash, device, rescore, argv) -> None:
    header_path = run_path / SCORES_HEADER
    with locked(run_path / ".scores.lock"):
        if header_path.is_file():
            try:
                header = json.loads(header_path.read_text())
            except json.JSONDecodeError as err:
                raise ScoreConflictError(f"{header_path}: unreadable ({err}); move it away or use --rescore") from err
            old = header.get("scorer_hash")
            mismatch = _run_mismatch(header, info)
            if old == scorer_hash and mismatch is None:
                return
            if not rescore:
                if mismatch is not None:
                    raise ScoreConflictError(
                        f"{header_path} holds scores of another generation run than {run_path / RUN_FILE} "
                        f"({mismatch}): the run was generated again since. Use --rescore to archive the old scores "
                        "as scores-<hash>.json[l] and score the current images."
                    )
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
            "run": run_identity(info),
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


def score_is_current(score: dict[str, Any], gen: dict[str, Any]) -> bool:
    """Whether a score record still describes the generation record ``gen`` of its unit: same fingerprint, same
    status (an ok generation may have been scored ok or failed by the scorer) and, for an image, the same sha256."""
    if score.get("fingerprint") != gen.get("fingerprint"):
        return False
    if gen.get("status") != "ok":
        return score.get("status") == gen.get("status")
    if score.get("status") not in ("ok", "failed") or score.get("stage") == "generation":
        return False
    expected = gen.get("image_sha256")
    return expected is None or score.get("image_sha256") == expected


def finish_scores(run_path: Path, scorer_hash: str, manifest: Manifest | str | Path | None = None) -> Counter:
    """Store the aggregate of the current scores in scores.json and the run's results.json
    (:mod:`msibench.scoring.results`); return the count of each status among them. Under the folder's scores lock,
    from every current score record, so the last of several scoring shards to finish leaves the whole run's."""
    from msibench.scoring.aggregate import aggregate, summary_to_json
    from msibench.scoring.results import build_results, write_results

    header_path = run_path / SCORES_HEADER
    with locked(run_path / ".scores.lock"):
        header = json.loads(header_path.read_text())
        if header.get("scorer_hash") != scorer_hash:
            return Counter()
        scored = load_scored_run(run_path, manifest)
        counts = Counter(str(r.get("status")) for r in scored.records)
        groups = aggregate(scored.records)
        header["summary"] = summary_to_json(groups)
        header["counts"] = dict(counts)
        atomic_write_bytes(header_path, (json.dumps(header, indent=2, sort_keys=True) + "\n").encode())
        write_results(run_path, build_results(run_path, scored, groups, counts))
    return counts


def _current(scores, scorer_hash, generated) -> list[dict[str, Any]]:
    return [
        r
        for r in scores
        if r.get("scorer") == scorer_hash
        and record_key(r) in generated
        and score_is_current(r, generated[record_key(r)])
    ]


@dataclass(frozen=True)
class TrackCoverage:
    """What of a track was generated and scored, against the manifest."""

    track: str
    tasks: int  # tasks of the track in the manifest
    tasks_generated: int  # of them, with at least one generation record (ok, failed or skipped)
    images: int  # generation records of the track
    images_scored: int  # of them, with a current score record (ok, or a failure with its reason)
    # samples every task should have: the largest --seeds its records were generated with (None: records older than
    # that field, not checked). Every selected (task, sample) gets a record (ok, failed or skipped), so a generated
    # task with fewer is partly generated, e.g. a second seed that one shard of two added.
    samples_per_task: int | None = None
    tasks_short: int = 0  # generated tasks with fewer samples than samples_per_task

    @property
    def complete(self) -> bool:
        return self.tasks_generated == self.tasks and not self.tasks_short and self.images_scored == self.images

    @property
    def generated(self) -> bool:
        return self.images > 0

    def describe(self) -> str:
        parts = [f"{self.track} {self.tasks_generated}/{self.tasks} tasks"]
        if self.tasks_short:
            parts.append(f"{self.tasks_short} of them with fewer than {self.samples_per_task} samples")
        parts.append(f"{self.images_scored}/{self.images} images scored")
        return ", ".join(parts)


@dataclass(frozen=True)
class ScoredRun:
    header: dict[str, Any]
    info: dict[str, Any]
    records: list[dict[str, Any]]  # current score records only
    stale: int  # score records of the current scorer that no longer match a generation record
    coverage: tuple[TrackCoverage, ...]
    max_k: int | None = None  # the largest K of the manifest's multi-track tasks


def load_scored_run(run_dir: str | Path, manifest: Manifest | str | Path | None = None) -> ScoredRun:
    """The current scores of a run folder, checked against its ``run.json`` and ``records.jsonl``, with what they
    cover of the run's manifest; scores made for another generation run are refused."""
    run_path = Path(run_dir)
    header_path = run_path / SCORES_HEADER
    if not header_path.is_file():
        raise ScoreError(f"{header_path}: not found; score the run first with `msibench score {run_path}`")
    try:
        header = json.loads(header_path.read_text())
    except json.JSONDecodeError as err:
        raise ScoreError(f"{header_path}: not valid JSON: {err}") from err
    info = read_run_info(run_path)
    mismatch = _run_mismatch(header, info)
    if mismatch is not None:
        raise ScoreError(
            f"{header_path}: these scores belong to another generation run than {run_path / RUN_FILE} ({mismatch}); "
            f"score the current images with `msibench score {run_path} --rescore`"
        )
    generated = {record_key(r): r for r in read_records(run_path / RECORDS_FILE)}
    if not generated:
        raise ScoreError(
            f"{run_path / RECORDS_FILE}: no generation records; the scores cannot be checked against them"
        )
    scorer_hash = header.get("scorer_hash")
    scores = [r for r in read_records(run_path / SCORES_FILE) if r.get("scorer") == scorer_hash]
    records = _current(scores, scorer_hash, generated)
    task_manifest = resolve_run_manifest(run_path, info, manifest)
    scored = {record_key(r) for r in records}
    coverage = []
    for track in TRACKS:
        tasks = {t.id for t in task_manifest.tasks if t.track == track}
        units = [key for key, gen in generated.items() if key[0] in tasks]
        asked = [int(generated[key]["samples_per_task"]) for key in units if generated[key].get("samples_per_task")]
        samples_per_task = max(asked, default=None)
        samples = Counter(task for task, i in units if samples_per_task is None or i < samples_per_task)
        coverage.append(
            TrackCoverage(
                track=track,
                tasks=len(tasks),
                tasks_generated=len({task for task, _ in units}),
                images=len(units),
                images_scored=sum(1 for key in units if key in scored),
                samples_per_task=samples_per_task,
                tasks_short=sum(1 for n in samples.values() if samples_per_task is not None and n < samples_per_task),
            )
        )
    max_k = max((t.k for t in task_manifest.tasks if t.track == "multi"), default=None)
    return ScoredRun(header, info, records, len(scores) - len(records), tuple(coverage), max_k)


def load_scores(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(scores.json header, current score records) of a scored run folder (see :func:`load_scored_run`)."""
    scored = load_scored_run(run_dir)
    return scored.header, scored.records


def resolve_run_manifest(run_path: Path, info: dict[str, Any], override: Manifest | str | Path | None) -> Manifest:
    """The manifest a run was generated from: the override, else the run folder's own copy (``manifest.json``), else
    the recorded path, else the recorded packaged name, else any packaged manifest; the sha256 recorded in run.json
    must match, so a copy or file that changed is never used."""
    expected = info.get("manifest_sha256") or (info.get("manifest") or {}).get("sha256")
    if isinstance(override, Manifest):
        candidates: list[Any] = [override]
    elif override is not None:
        candidates = [Path(override)]
    else:
        recorded = info.get("manifest") or {}
        candidates = [run_path / RUN_MANIFEST_COPY] if (run_path / RUN_MANIFEST_COPY).is_file() else []
        candidates += [Path(recorded["path"])] if recorded.get("path") else []
        names = [recorded["name"]] if recorded.get("name") in PACKAGED_MANIFESTS else []
        candidates += [*names, *(n for n in PACKAGED_MANIFESTS if n not in names)]
    tried = []
    for cand in candidates:
        try:
            manifest = cand if isinstance(cand, Manifest) else load_manifest(cand)
        except ManifestError as err:
            tried.append(f"{cand} ({err})")
            continue
        if expected is None or manifest.sha256 == expected:
            return manifest
        tried.append(f"{manifest.path} (sha256 {manifest.sha256[:12]})")
    raise ScoreError(
        f"{run_path / RUN_FILE}: the run was made from manifest sha256 {str(expected)[:12]}, "
        f"not found in: {'; '.join(tried)}. Pass --manifest PATH to that manifest."
    )


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
