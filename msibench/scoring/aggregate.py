"""Statistics over score records, as pure functions: nothing here reads files or loads models.

- Every metric is first averaged per task over that task's scored samples (multi-seed runs), so each task
  weighs the same whatever its number of samples.
- Per track, and per track and subject count K: mean and standard deviation over tasks and a 95 % bootstrap
  confidence interval (scipy.stats.bootstrap, BCa, resampling tasks, fixed seed, so the same records always
  give the same interval).
- Z-Acc is a ratio of sums: correct pairs / evaluated pairs over all tasks with overlapping subjects (per task,
  the mean over samples of correct pairs); tasks without overlapping subjects are left out and counted. Its
  interval resamples tasks and recomputes the ratio. Identity collapse (across categories, and within one:
  ``collapse_same``) is a ratio of sums in the same way: confused subjects / evaluable subjects (lower is better).
  ``found`` is the mean per-image fraction of subjects found (identity cropped from detections).
- :func:`compare` pairs two runs task by task and gives the mean difference (B - A) with a paired bootstrap
  interval per metric.

Failures: an image whose *generation* failed (the method raised, ran out of memory, wrote nothing) scores 0 on
every metric its track reports, counts all of its task's Z-Acc pairs as wrong and all of its evaluable subjects
as collapsed, so a method that fails on the hard tasks cannot raise its mean by leaving them out; a track whose
generations all failed therefore scores 0 (collapse 1), not "–". Skipped images (the method declares it
cannot do the task, e.g. K above its ``max_subjects``) and images the *scorer* failed on (unreadable file, a
scorer error: not the method's fault) carry no values and are only counted.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MetricInfo:
    key: str
    label: str
    tracks: tuple[str, ...]
    lower_is_better: bool = False  # identity collapse: its worst values are the highest


METRICS: dict[str, MetricInfo] = {
    m.key: m
    for m in (
        MetricInfo("yolo_subj", "YOLO-Subj", ("multi",)),
        MetricInfo("yolo_subj_exact", "YOLO-Subj exact", ("multi",)),
        MetricInfo("yolo_l", "YOLO-L", ("multi",)),
        MetricInfo("yolo_l50", "YOLO-L@0.5", ("multi",)),
        MetricInfo("dino_i", "DINO-I", ("single", "multi")),
        MetricInfo("clip_i", "CLIP-I", ("single", "multi")),
        MetricInfo("clip_b", "CLIP-B", ("single", "multi")),
        MetricInfo("z_acc", "Z-Acc", ("multi",)),
        MetricInfo("collapse", "Collapse", ("multi",), lower_is_better=True),
        # beyond the paper (scorer code version 3): among look-alikes of one category, after the appearance pairing
        MetricInfo("collapse_same", "Collapse (same cat.)", ("multi",), lower_is_better=True),
        # the fraction of subjects found (identity cropped from detections); not-found subjects score identity 0
        MetricInfo("found", "Found", ("single", "multi")),
    )
}
TRACK_ORDER = ("single", "multi")
RATIO_METRICS = {
    "z_acc": ("z_correct", "z_pairs"),
    "collapse": ("collapse_confused", "collapse_subjects"),
    "collapse_same": ("collapse_same_confused", "collapse_same_subjects"),
}
# The value a failed generation gets where it is not 0: every subject collapsed.
_FAILED_VALUE = {"collapse": 1.0, "collapse_same": 1.0}
# Per ratio metric: the field of a failure record that gives its task's denominator when no sample was scored.
_FAILED_DENOMINATOR = {
    "z_acc": "overlap_pairs",
    "collapse": "collapse_subjects",
    "collapse_same": "collapse_same_subjects",
}
# Ratio metrics a failed generation gets entirely wrong (all confused), rather than 0 correct of its pairs.
_FAILED_ALL = {"collapse", "collapse_same"}


def _track_keys(track: str) -> set[str]:
    """Every metric key the default scorer writes for ``track`` (for failure records written before
    ``metrics_expected``)."""
    from msibench.scoring.scorer import METRIC_KEYS, TRACK_METRICS

    return {key for group in TRACK_METRICS.get(track, ()) for key in METRIC_KEYS[group]}


@dataclass(frozen=True)
class Stat:
    n: int  # tasks that carry the metric
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class GroupSummary:
    track: str
    k: int | None  # None: every K of the track
    n_tasks: int
    n_images: int
    n_failed: int
    n_skipped: int
    metrics: dict[str, Stat]
    z_tasks_without_overlap: int = 0
    collapse_tasks_one_category: int = 0


@dataclass(frozen=True)
class Difference:
    track: str
    metric: str
    n: int  # tasks present in both runs
    mean_a: float | None
    mean_b: float | None
    diff: float | None  # B - A
    ci_low: float | None
    ci_high: float | None


def is_generation_failure(rec: dict[str, Any]) -> bool:
    """True for the score record of an image whose generation failed (not one the scorer failed on)."""
    if rec.get("status") != "failed":
        return False
    if "stage" in rec:
        return rec["stage"] == "generation"
    return str(rec.get("reason") or "").startswith("generation failed")  # records written before ``stage``


def task_values(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(track, task_id) -> {"k": K, metric: mean over the task's samples, ...}; ratio parts are averaged too.

    Samples whose generation failed count 0 on every metric that the track's ok records carry, or that the
    failure record says the scorer reports (``metrics_expected``; every key of the track for older records), so a
    track without a single generated image scores 0 rather than nothing (see the module docstring); their Z-Acc
    pairs are the task's pairs, all wrong, and their evaluable subjects all count as collapsed.

    Records are taken in (track, task, sample) order, so the statistics (the bootstrap's draws, the floating-point
    sums) do not depend on the order they were written in: a resumed or sharded scoring gives the same figures."""
    records = sorted(
        records, key=lambda r: (str(r.get("track")), str(r.get("task_id")), int(r.get("sample_index") or 0))
    )
    sums: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ks: dict[tuple[str, str], int] = {}
    track_metrics: dict[str, set[str]] = defaultdict(set)
    # a ratio metric's denominator (Z-Acc pairs, collapse-evaluable subjects) depends on the task only, so any
    # scored sample gives it
    task_den: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for rec in records:
        if rec.get("status") != "ok":
            continue
        key = (str(rec["track"]), str(rec["task_id"]))
        ks[key] = int(rec["k"])
        for metric, value in (rec.get("metrics") or {}).items():
            track_metrics[key[0]].add(metric)
            if value is not None:
                sums[key][metric].append(float(value))
        for metric, (_, den_key) in RATIO_METRICS.items():
            if den_key in (rec.get("metrics") or {}):
                task_den[metric][key] = float(rec["metrics"][den_key])
    failures = [rec for rec in records if is_generation_failure(rec)]
    for track in {str(rec["track"]) for rec in failures}:
        if not track_metrics[track]:  # no scored image of the track: the failure records say what it reports
            expected = [rec.get("metrics_expected") for rec in failures if str(rec["track"]) == track]
            known = [set(e) for e in expected if e is not None]
            track_metrics[track] = set.union(*known) if known else _track_keys(track)
    for rec in failures:
        key = (str(rec["track"]), str(rec["task_id"]))
        ks[key] = int(rec["k"])
        ratio_of = {key_: ratio for ratio, parts in RATIO_METRICS.items() for key_ in (ratio, *parts)}
        for metric in track_metrics[key[0]]:
            ratio = ratio_of.get(metric)
            if ratio is None:
                sums[key][metric].append(0.0)
                continue
            num_key, den_key = RATIO_METRICS[ratio]
            count = task_den[ratio].get(key, rec.get(_FAILED_DENOMINATOR[ratio]))
            if count is None:
                continue
            if metric == den_key:
                sums[key][metric].append(float(count))
            elif metric == num_key:  # every pair wrong: 0 correct; every evaluable subject collapsed
                sums[key][metric].append(float(count) if ratio in _FAILED_ALL else 0.0)
            elif count:  # the rate itself, only where it is defined
                sums[key][metric].append(_FAILED_VALUE.get(metric, 0.0))
    out = {}
    for key, k in ks.items():
        row: dict[str, Any] = {"k": k}
        for metric, values in sums[key].items():
            row[metric] = float(np.mean(values))
        out[key] = row
    return out


def aggregate(
    records: Sequence[dict[str, Any]], *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> list[GroupSummary]:
    """Per (track, all K) and per (track, K) statistics of ``records``; see the module docstring."""
    per_task = task_values(records)
    groups: list[GroupSummary] = []
    tracks = [t for t in TRACK_ORDER if any(str(r.get("track")) == t for r in records)]
    for track in tracks:
        ks = sorted({int(r["k"]) for r in records if str(r.get("track")) == track})
        for k in [None, *ks]:
            recs = [r for r in records if str(r.get("track")) == track and (k is None or int(r["k"]) == k)]
            tasks = {key: row for key, row in per_task.items() if key[0] == track and (k is None or row["k"] == k)}
            metrics: dict[str, Stat] = {}
            for info in METRICS.values():
                if track not in info.tracks:
                    continue
                stat = _metric_stat(info.key, list(tasks.values()), confidence, n_resamples, seed)
                if stat is not None:
                    metrics[info.key] = stat
            no_overlap = sum(1 for row in tasks.values() if "z_pairs" in row and row["z_pairs"] == 0)
            one_category = sum(
                1 for row in tasks.values() if "collapse_subjects" in row and row["collapse_subjects"] == 0
            )
            groups.append(
                GroupSummary(
                    track=track,
                    k=k,
                    n_tasks=len(tasks),
                    n_images=sum(1 for r in recs if r.get("status") == "ok"),
                    n_failed=sum(1 for r in recs if r.get("status") == "failed"),
                    n_skipped=sum(1 for r in recs if r.get("status") == "skipped"),
                    metrics=metrics,
                    z_tasks_without_overlap=no_overlap,
                    collapse_tasks_one_category=one_category,
                )
            )
    return groups


def find_group(summary: Sequence[GroupSummary], track: str, k: int | None = None) -> GroupSummary | None:
    for group in summary:
        if group.track == track and group.k == k:
            return group
    return None


def _metric_stat(metric: str, rows: list[dict[str, Any]], confidence, n_resamples, seed) -> Stat | None:
    if metric in RATIO_METRICS:
        num_key, den_key = RATIO_METRICS[metric]
        rows = [r for r in rows if r.get(den_key, 0) > 0]
        if not rows:
            return None
        num = np.array([r[num_key] for r in rows], dtype=np.float64)
        den = np.array([r[den_key] for r in rows], dtype=np.float64)
        per_task = num / den
        lo, hi = _bootstrap((num, den), _ratio_of_sums, confidence, n_resamples, seed)
        return Stat(len(rows), float(num.sum() / den.sum()), _std(per_task), lo, hi)
    values = np.array([r[metric] for r in rows if metric in r], dtype=np.float64)
    if len(values) == 0:
        return None
    lo, hi = _bootstrap((values,), _mean, confidence, n_resamples, seed)
    return Stat(len(values), float(values.mean()), _std(values), lo, hi)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _ratio_of_sums(num, den, axis=-1):
    return np.sum(num, axis=axis) / np.sum(den, axis=axis)


def _ratio_difference(num_a, den_a, num_b, den_b, axis=-1):
    return _ratio_of_sums(num_b, den_b, axis) - _ratio_of_sums(num_a, den_a, axis)


def _std(values: np.ndarray) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _bootstrap(data: tuple[np.ndarray, ...], statistic, confidence, n_resamples, seed):
    """Percentile-BCa bootstrap interval; degenerate samples (one task, or all tasks equal) get a point interval
    (one task: no interval at all)."""
    from scipy import stats

    n = len(data[0])
    if n < 2:
        return None, None
    point = float(statistic(*data))
    if all(np.all(d == d[0]) for d in data):
        return point, point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa warns on near-degenerate samples; we fall back below
        # BCa first; a near-degenerate sample can leave it without finite ends, then the percentile interval.
        for method in ("BCa", "percentile"):
            res = stats.bootstrap(
                data,
                statistic,
                paired=len(data) > 1,
                vectorized=True,
                confidence_level=confidence,
                n_resamples=n_resamples,
                method=method,
                random_state=np.random.default_rng(seed),
            )
            lo, hi = res.confidence_interval
            if np.isfinite(lo) and np.isfinite(hi):
                break
    return float(lo), float(hi)


def compare(
    records_a: Sequence[dict[str, Any]],
    records_b: Sequence[dict[str, Any]],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> list[Difference]:
    """Paired differences B - A per track and metric over the tasks both runs scored."""
    ta, tb = task_values(records_a), task_values(records_b)
    out = []
    for track in TRACK_ORDER:
        common = sorted(key for key in ta.keys() & tb.keys() if key[0] == track)
        if not common:
            continue
        for info in METRICS.values():
            if track not in info.tracks:
                continue
            if info.key in RATIO_METRICS:
                num_key, den_key = RATIO_METRICS[info.key]
                keys = [k for k in common if ta[k].get(den_key, 0) > 0 and tb[k].get(den_key, 0) > 0]
                if not keys:
                    continue
                arrays = tuple(
                    np.array([rows[k][part] for k in keys], dtype=np.float64)
                    for rows in (ta, tb)
                    for part in (num_key, den_key)
                )
                mean_a = float(_ratio_of_sums(arrays[0], arrays[1]))
                mean_b = float(_ratio_of_sums(arrays[2], arrays[3]))
                lo, hi = _bootstrap(arrays, _ratio_difference, confidence, n_resamples, seed)
            else:
                keys = [k for k in common if info.key in ta[k] and info.key in tb[k]]
                if not keys:
                    continue
                a = np.array([ta[k][info.key] for k in keys], dtype=np.float64)
                b = np.array([tb[k][info.key] for k in keys], dtype=np.float64)
                mean_a, mean_b = float(a.mean()), float(b.mean())
                lo, hi = _bootstrap((b - a,), _mean, confidence, n_resamples, seed)
            out.append(Difference(track, info.key, len(keys), mean_a, mean_b, mean_b - mean_a, lo, hi))
    return out


def summary_to_json(summary: Sequence[GroupSummary]) -> list[dict[str, Any]]:
    return [{**asdict(g), "metrics": {m: asdict(s) for m, s in g.metrics.items()}} for g in summary]
