"""``results.json``: one machine-readable results file per scored run, with a documented, versioned schema.

Written by every scoring pass (:func:`write_results`, beside ``scores.json``) from the same statistics the table
computes (:func:`msibench.scoring.aggregate.aggregate` over the run's current score records), and read back by
``msibench table``, ``msibench report`` and ``msibench leaderboard`` (:func:`read_results`), so that no output derives
its numbers its own way. lm-eval's ``results_*.json`` is the model. The schema (``docs/results-schema.md``):

    schema           "msibench.results"
    schema_version   1 (a reader refuses another major version, naming it)
    created          ISO date of writing
    source           sha256 of records.jsonl and scores.jsonl when written: a file whose sources changed since
                     is stale, and readers recompute (and :func:`read_results` says so)
    run              dir (folder name), method, fingerprint_hash, config (the method's fingerprint config),
                     method_source (where the class came from, when run.json records it), base_seed,
                     samples_per_task, device, date, git, command
    manifest         name, version, sha256
    scorer           hash, version (every setting of the scorer: weights, thresholds, crop mode, ...)
    packages         generation (run.json) and scoring (scores.json) package versions
    coverage         per track: tasks, tasks_generated, images, images_scored, samples_per_task, tasks_short,
                     generated, complete
    table            per track: {metric: {mean, std, ci_low, ci_high, n, lower_is_better}} -- Table I's cells
    by_k             per track: {K: {n_tasks, n_images, n_failed, n_skipped, metrics: {...as table}}}
    groups           the full aggregate (every (track, K) group, with counts), as scores.json's summary
    counts           score records per status
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msibench.cache import atomic_write_bytes, sha256_file

if TYPE_CHECKING:
    from msibench.scoring.aggregate import GroupSummary
    from msibench.scoring.store import ScoredRun

RESULTS_FILE = "results.json"
SCHEMA = "msibench.results"
SCHEMA_VERSION = 1


class ResultsError(ValueError):
    """A results.json that cannot be read as this schema; the message names the file and field."""


def _sources(run_path: Path) -> dict[str, str | None]:
    def sha(name: str) -> str | None:
        path = run_path / name
        return sha256_file(path) if path.is_file() else None

    return {"records_sha256": sha("records.jsonl"), "scores_sha256": sha("scores.jsonl")}


def build_results(run_path: Path, scored: ScoredRun, groups: list[GroupSummary], counts: dict[str, int]) -> dict:
    """The results document of a scored run (see the module docstring for the fields)."""
    from msibench.scoring.aggregate import METRICS, summary_to_json

    info, header = scored.info, scored.header
    manifest = info.get("manifest") or {}
    coverage = {
        c.track: {
            "tasks": c.tasks,
            "tasks_generated": c.tasks_generated,
            "images": c.images,
            "images_scored": c.images_scored,
            "samples_per_task": c.samples_per_task,
            "tasks_short": c.tasks_short,
            "generated": c.generated,
            "complete": c.complete,
        }
        for c in scored.coverage
    }

    def cells(group: GroupSummary) -> dict[str, Any]:
        return {
            metric: {
                "mean": stat.mean,
                "std": stat.std,
                "ci_low": stat.ci_low,
                "ci_high": stat.ci_high,
                "n": stat.n,
                "lower_is_better": METRICS[metric].lower_is_better if metric in METRICS else False,
            }
            for metric, stat in group.metrics.items()
        }

    table = {g.track: cells(g) for g in groups if g.k is None}
    by_k: dict[str, dict[str, Any]] = {}
    for g in groups:
        if g.k is not None:
            by_k.setdefault(g.track, {})[str(g.k)] = {
                "n_tasks": g.n_tasks,
                "n_images": g.n_images,
                "n_failed": g.n_failed,
                "n_skipped": g.n_skipped,
                "metrics": cells(g),
            }
    fingerprint = info.get("fingerprint") or {}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": _sources(run_path),
        "run": {
            "dir": run_path.name,
            "method": info.get("method"),
            "fingerprint_hash": info.get("fingerprint_hash"),
            "config": fingerprint.get("config"),
            "method_source": info.get("method_source"),
            "base_seed": info.get("base_seed"),
            "samples_per_task": max((c.samples_per_task or 0 for c in scored.coverage), default=0) or None,
            "device": info.get("device"),
            "date": info.get("date"),
            "git": info.get("git"),
            "command": info.get("command"),
        },
        "manifest": {k: manifest.get(k) for k in ("name", "version", "sha256")},
        "scorer": {"hash": header.get("scorer_hash"), "version": header.get("scorer")},
        "packages": {"generation": info.get("packages"), "scoring": header.get("packages")},
        "coverage": coverage,
        "table": table,
        "by_k": by_k,
        "groups": summary_to_json(groups),
        "counts": dict(counts),
    }


def write_results(run_path: Path, document: dict[str, Any]) -> Path:
    path = run_path / RESULTS_FILE
    atomic_write_bytes(path, (json.dumps(document, indent=2, sort_keys=True, default=str) + "\n").encode())
    return path


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's results.json when it exists and describes the run's current records and scores; None when it is
    absent or stale (the caller recomputes). A file of another schema or major version is an error naming it."""
    run_path = Path(run_dir)
    path = run_path / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path}: unreadable ({err}); score the run again to rewrite it") from err
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise ResultsError(f"{path}: field 'schema': expected {SCHEMA!r}, got {document.get('schema')!r}")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(
            f"{path}: field 'schema_version': {version!r}, this msibench reads version {SCHEMA_VERSION}; score the "
            "run again with this msibench to rewrite it"
        )
    if document.get("source") != _sources(run_path):
        return None
    return document


def groups_from_results(document: dict[str, Any]) -> list[GroupSummary]:
    """The aggregate stored in a results document, as :class:`GroupSummary` objects."""
    from msibench.scoring.aggregate import GroupSummary, Stat

    out = []
    for g in document["groups"]:
        metrics = {m: Stat(**s) for m, s in g["metrics"].items()}
        out.append(GroupSummary(**{**g, "metrics": metrics}))
    return out
