"""``msibench report``: a static, self-contained HTML report of one or several runs.

The report is one ``index.html`` plus ``assets/`` (stylesheet, script, thumbnails, the per-K figure and its CSV).
Every link is relative and inside the folder, so it opens from disk on an offline machine; nothing is fetched from
a server or a CDN.

- Top: Table I of the scored runs (rendered by :mod:`msibench.scoring.table`, with 95 % intervals), the per-K
  figure, and each run's metadata from ``run.json`` (method config, fingerprint, manifest, packages, git hash,
  device, date) with the measured seconds and peak memory per image from ``records.jsonl``.
- Per task: the prompt and background, the reference cut-outs with their categories, the target layout (boxes
  with category and z) and, per run, each sample's image with the detections of its score record drawn over it
  (matched, unmatched and wrong-category detections in different styles; subjects not found as dashed targets),
  its scores and the scorer's readable reasons. Failed and skipped samples show their reason.
- Filters (track, K, category, run, status) and sorting by any metric of any run (worst first) run in the page's
  own script, over values embedded in each task's ``data-`` attributes.

Unscored runs are shown too (images and layout only); they are left out of Table I and the figure.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from msibench.bench.manifest import Manifest, Task
from msibench.records import RECORDS_FILE, exclusive_or_busy, read_records, record_key
from msibench.report.thumbs import THUMBS_DIR, ThumbnailStore

logger = logging.getLogger(__name__)

ASSETS = ("report.css", "report.js")
DEFAULT_THUMB_SIZE = 256


class ReportError(ValueError):
    """A report cannot be built from the given runs; the message names the run folder and what to do."""


@dataclass
class RunData:
    index: int
    label: str
    path: Path
    info: dict[str, Any]
    records: dict[tuple[str, int], dict[str, Any]]
    scores: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    header: dict[str, Any] | None = None
    result: Any = None  # msibench.scoring.table.RunResult of a scored run
    task_values: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> metric -> mean over samples
    manifest: Manifest | None = None

    @property
    def scored(self) -> bool:
        return self.header is not None

    @property
    def method(self) -> str | None:
        return self.info.get("method")


@dataclass(frozen=True)
class ReportSummary:
    out: Path
    runs: int
    tasks: int
    images: int
    thumbnails_made: int
    thumbnails_cached: int
    seconds: float
    unreadable: int = 0  # images and references that do not decode (shown as unreadable in their cards)


# ------------------------------------------------------------------------------------------------------ loading


def load_report_run(spec: str | Path, index: int, manifest_override: str | Path | None = None) -> RunData:
    """A run folder (``DIR`` or ``LABEL=DIR``): run.json, generation records and, when scored, the scores."""
    from msibench.scoring.score import resolve_run_manifest
    from msibench.scoring.scorer import ScoreError
    from msibench.scoring.store import SCORES_HEADER, load_scores, read_run_info
    from msibench.scoring.table import METHOD_LABELS, load_run, parse_run_spec

    label, path = parse_run_spec(str(spec))
    if not path.is_dir():
        raise ReportError(f"{path}: no such run folder")
    try:
        info = read_run_info(path)
        manifest = resolve_run_manifest(path, info, manifest_override)
    except ScoreError as err:
        raise ReportError(str(err)) from err
    records = {record_key(r): r for r in read_records(path / RECORDS_FILE)}
    if not records:
        logger.warning("%s: no generation records yet", path / RECORDS_FILE)
    method = info.get("method")
    run = RunData(
        index=index,
        label=label or METHOD_LABELS.get(str(method), str(method or path.name)),
        path=path,
        info=info,
        records=records,
        manifest=manifest,
    )
    if (path / SCORES_HEADER).is_file():
        try:
            header, scores = load_scores(path)
            run.result = load_run(str(path), label=run.label)
        except ScoreError as err:
            raise ReportError(str(err)) from err
        run.header = header
        run.scores = {record_key(r): r for r in scores}
        from msibench.scoring.aggregate import task_values

        run.task_values = {task_id: row for (_, task_id), row in task_values(scores).items()}
    return run


def _unique_labels(runs: list[RunData]) -> None:
    """Runs of one method without a LABEL= get their fingerprint hash appended, so columns stay tellable apart (the
    rule of every table and figure: :func:`msibench.scoring.table.distinct_labels`)."""
    from msibench.scoring.table import distinct_labels

    labels = distinct_labels([r.label for r in runs], [r.info.get("fingerprint_hash") or r.path.name for r in runs])
    for run, label in zip(runs, labels, strict=True):
        run.label = label
    if any(r.result is not None for r in runs):
        from dataclasses import replace

        for run in runs:
            if run.result is not None and run.result.label != run.label:
                run.result = replace(run.result, label=run.label)


# ----------------------------------------------------------------------------------------------------- building


def build_report(
    run_specs: list[str | Path],
    out: str | Path,
    *,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    workers: int | None = None,
    manifest: str | Path | None = None,
    coco_root: str | Path | None = None,
    paper: bool = False,
    title: str | None = None,
    progress: bool = False,
) -> ReportSummary:
    """Write ``out/index.html`` and ``out/assets/`` for ``run_specs``; see the module docstring. One report per
    ``out`` at a time: a second one is refused at once (:class:`~msibench.records.LockBusyError`, naming the holder),
    since both would write and prune the same thumbnails."""
    if not run_specs:
        raise ReportError("msibench report needs at least one run folder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_or_busy(
        out / ".report.lock", f"the report in {out}", "wait for it to end or stop it, or write into another --out"
    ):
        return _build_report(run_specs, out, thumb_size, workers, manifest, coco_root, paper, title, progress)


def _build_report(run_specs, out, thumb_size, workers, manifest, coco_root, paper, title, progress) -> ReportSummary:
    start = time.perf_counter()
    runs = [load_report_run(spec, i, manifest) for i, spec in enumerate(run_specs)]
    _unique_labels(runs)
    shas = {r.manifest.sha256 for r in runs}
    if len(shas) > 1:
        listing = "; ".join(f"{r.path}: {r.manifest.version} ({r.manifest.sha256[:12]})" for r in runs)
        raise ReportError(f"the runs were made from different benchmark manifests, their tasks differ: {listing}")
    bench = runs[0].manifest
    wanted = {task_id for r in runs for task_id, _ in r.records}
    tasks = [t for t in bench.tasks if t.id in wanted]
    unknown = sorted(wanted - {t.id for t in tasks})
    if unknown:
        raise ReportError(f"{runs[0].path}: tasks {unknown[:5]} are not in manifest {bench.path}")

    out = Path(out)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    for name in ASSETS:
        data = (resources.files("msibench.report") / "templates" / name).read_bytes()
        (out / "assets" / name).write_bytes(data)

    thumbs = ThumbnailStore(out, thumb_size, workers)
    references = _reference_files(bench, tasks, coco_root)
    ref_sha = {path: thumbs.add(path) for path in references.values() if path is not None}
    image_sha: dict[tuple[int, str, int], str] = {}
    missing_images: set[tuple[int, str, int]] = set()
    for run in runs:
        for key, rec in run.records.items():
            if rec.get("status") != "ok" or not rec.get("image"):
                continue
            path = run.path / str(rec["image"])
            if path.is_file():
                image_sha[(run.index, *key)] = thumbs.add(path)
            else:
                missing_images.add((run.index, *key))
    thumbs.build(progress=progress)
    _prune(out / "assets" / THUMBS_DIR, {Path(thumbs.rel(s)).name for s in thumbs.sizes})

    figure = _by_k_figure(runs, out)
    page = _Page(runs, tasks, thumbs, references, ref_sha, image_sha, missing_images, figure, paper)
    template = Template((resources.files("msibench.report") / "templates" / "page.html").read_text("utf-8"))
    text = template.substitute(
        title=html.escape(title or "msibench report: " + ", ".join(r.label for r in runs)),
        generated=html.escape(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
        body=page.body(),
    )
    from msibench.cache import atomic_write_bytes

    atomic_write_bytes(out / "index.html", text.encode("utf-8"))
    return ReportSummary(
        out=out,
        runs=len(runs),
        tasks=len(tasks),
        images=len(image_sha),
        thumbnails_made=thumbs.made,
        thumbnails_cached=thumbs.from_cache + thumbs.present,
        seconds=time.perf_counter() - start,
        unreadable=len(thumbs.errors),
    )


def _prune(folder: Path, keep: set[str]) -> None:
    for path in folder.glob("*.jpg"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _reference_files(bench: Manifest, tasks: list[Task], coco_root: str | Path | None) -> dict[int, Path | None]:
    """Reference annotation id -> its cut-out in the cache (None when it is not prepared and cannot be)."""
    from msibench.bench.prepare import PrepareError, missing_references, prepare, reference_paths, resolve_coco_root

    missing = missing_references(bench, tasks)
    if missing:
        try:
            root = resolve_coco_root(coco_root)
        except PrepareError as err:
            raise ReportError(str(err)) from err
        if root is not None:
            try:
                prepare(bench, root, tasks=tasks, verify_all=False)
            except PrepareError as err:
                raise ReportError(str(err)) from err
        else:
            logger.warning(
                "%d reference cut-outs are not prepared in the cache: the report shows their categories only "
                "(run `msibench data prepare --coco-root DIR`, or pass --coco-root)",
                len(missing),
            )
    out: dict[int, Path | None] = {}
    for task in tasks:
        for s in task.subjects:
            path = reference_paths(s.reference, bench.sources[s.reference.image_id]).image
            out[s.reference.annotation_id] = path if path.is_file() else None
    return out


def _by_k_figure(runs: list[RunData], out: Path) -> dict[str, str] | None:
    scored = [r.result for r in runs if r.result is not None]
    if not scored:
        return None
    from msibench.scoring.plot import plot_by_k

    try:
        paths = plot_by_k(scored, out / "assets" / "by_k", width="page")
    except ValueError as err:
        logger.warning("per-K figure left out: %s", err)
        return None
    return {p.suffix.lstrip("."): f"assets/{p.name}" for p in paths}


# ------------------------------------------------------------------------------------------------------ the page


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _attr_json(value: Any) -> str:
    return _e(json.dumps(value, separators=(",", ":"), sort_keys=True))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct_box(box) -> str:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = max(0.0, min(1.0, x0)), max(0.0, min(1.0, y0))
    x1, y1 = max(x0, min(1.0, x1)), max(y0, min(1.0, y1))
    return f"left:{x0 * 100:.2f}%;top:{y0 * 100:.2f}%;width:{(x1 - x0) * 100:.2f}%;height:{(y1 - y0) * 100:.2f}%"


def _box(box, cls: str, label: str, title: str | None = None, extra_style: str = "") -> str:
    tip = f' title="{_e(title)}"' if title else ""
    return f'<div class="bx {cls}" style="{_pct_box(box)}{extra_style}"{tip}><span>{_e(label)}</span></div>'


# One colour per subject (Okabe-Ito, as the figures): a reference's frame and its layout box share it.
SUBJECT_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def subject_color(index: int) -> str:
    return SUBJECT_COLORS[index % len(SUBJECT_COLORS)]


def classify_detections(task: Task, rec: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Detections to draw for a score record, each with ``kind`` matched / unmatched / wrong, and whether the
    record holds the detector's full output (``detections``) or only the matched detections of ``subjects``."""
    task_ids = {s.category_id for s in task.subjects}
    task_names = {s.category for s in task.subjects}
    if isinstance(rec.get("detections"), list):
        out = []
        for d in rec["detections"]:
            if not isinstance(d, dict) or "box" not in d:
                continue
            subject = d.get("subject")
            in_task = d.get("category_id") in task_ids if "category_id" in d else d.get("category") in task_names
            kind = "matched" if subject is not None else "unmatched" if in_task else "wrong"
            out.append({**d, "kind": kind})
        return out, True
    out = []
    for j, s in enumerate(rec.get("subjects") or []):
        det = s.get("detection")
        if s.get("matched") and isinstance(det, dict) and "box" in det:
            out.append({**det, "category": s.get("category"), "subject": j, "kind": "matched"})
    return out, False


class _Page:
    def __init__(self, runs, tasks, thumbs, references, ref_sha, image_sha, missing_images, figure, paper) -> None:
        self.runs: list[RunData] = runs
        self.tasks: list[Task] = tasks
        self.thumbs: ThumbnailStore = thumbs
        self.references = references
        self.ref_sha = ref_sha
        self.image_sha = image_sha
        self.missing_images = missing_images
        self.figure = figure
        self.paper = paper

    def body(self) -> str:
        parts = [self._runs_header(), self._table(), self._figure(), self._metadata(), self._controls()]
        parts.append('<section id="tasks" aria-label="tasks">')
        parts.extend(self._task(t, i) for i, t in enumerate(self.tasks))
        parts.append("</section>")
        return "\n".join(p for p in parts if p)

    # ------------------------------------------------------------------------------------------ top of page
    def _runs_header(self) -> str:
        items = []
        for run in self.runs:
            state = "scored" if run.scored else "not scored: images and layout only"
            if run.header is not None:
                from msibench.scoring.table import scorer_identity

                scorer = run.header.get("scorer")
                words, pinned = scorer_identity(scorer if isinstance(scorer, dict) else None)
                state += f" by scorer {run.header.get('scorer_hash')}: {words}"
                state += "" if pinned else " (NOT the pinned scorers)"
            counts = Counter(str(r.get("status")) for r in run.records.values())
            count_text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            items.append(
                f'<li data-run="{run.index}"><b>{_e(run.label)}</b> <code>{_e(run.path)}</code> '
                f"({_e(run.method)}, {_e(count_text or 'no records')}; {state})"
                f'<br><span class="note coverage">{_e(self._coverage(run))}</span></li>'
            )
        return f'<section id="runs"><h2>Runs</h2><ol>{"".join(items)}</ol></section>'

    def _coverage(self, run: RunData) -> str:
        """Per track: tasks of the benchmark the run holds, its images and how many of them are scored."""
        parts = []
        for track in ("single", "multi"):
            total = sum(1 for t in run.manifest.tasks if t.track == track)
            recs = [(k, r) for k, r in run.records.items() if r.get("track") == track]
            if not total:
                continue
            tasks = len({k[0] for k, _ in recs})
            ok = [k for k, r in recs if r.get("status") == "ok"]
            scored = sum(1 for k in ok if (run.scores.get(k) or {}).get("status") == "ok")
            text = f"{track}: {tasks} of {total} tasks, {len(ok)} images"
            if run.scored:
                text += f", {scored} scored"
            parts.append(text)
        return "coverage: " + "; ".join(parts)

    def _table(self) -> str:
        scored = [r.result for r in self.runs if r.result is not None]
        if not scored:
            return (
                '<section id="table1"><h2>Table I</h2><p class="note">No run is scored yet: '
                "<code>msibench score RUN_DIR</code> adds the metrics.</p></section>"
            )
        from msibench.scoring.table import load_paper_table, render_table

        # the report shows every run, an incomplete one with its coverage in the row's label
        paper = load_paper_table() if self.paper else None
        table = render_table(scored, "html", paper=paper, ci=True, allow_partial=True)
        unscored = [r.label for r in self.runs if not r.scored]
        note = f'<p class="note">Not scored (not in the table): {_e(", ".join(unscored))}.</p>' if unscored else ""
        return f'<section id="table1"><h2>Table I</h2>{table}{note}</section>'

    def _figure(self) -> str:
        if not self.figure or "png" not in self.figure:
            return ""
        links = " · ".join(f'<a href="{_e(p)}">{_e(k.upper())}</a>' for k, p in sorted(self.figure.items()))
        return (
            '<section id="by-k"><h2>Scores by subject count K</h2>'
            f'<img class="figure" src="{_e(self.figure["png"])}" alt="metrics against the number of subjects K">'
            f'<p class="note">K = 1 is the single-subject track; 95 % bootstrap intervals. {links}</p></section>'
        )

    def _metadata(self) -> str:
        blocks = []
        for run in self.runs:
            info = run.info
            ok = [r for r in run.records.values() if r.get("status") == "ok"]
            secs = [float(r["seconds"]) for r in ok if r.get("seconds") is not None]
            peaks = [float(r["peak_memory_mb"]) for r in ok if r.get("peak_memory_mb") is not None]
            manifest = info.get("manifest") or {}
            rows = [
                ("method", info.get("method")),
                ("run folder", str(run.path)),
                ("fingerprint", info.get("fingerprint_hash")),
                ("manifest", f"{manifest.get('version')} (sha256 {str(info.get('manifest_sha256'))[:12]})"),
                ("base seed", info.get("base_seed")),
                ("git", info.get("git")),
                ("device", info.get("device")),
                ("date", info.get("date")),
                ("python", info.get("python")),
                ("command", " ".join(map(str, info.get("command") or []))),
                (
                    "seconds per image",
                    f"mean {statistics.fmean(secs):.3f}, median {statistics.median(secs):.3f} over {len(secs)} images"
                    if secs
                    else "n/a",
                ),
                ("peak memory per image", f"max {max(peaks):.0f} MB" if peaks else "n/a (not measured on CPU)"),
                ("capabilities", json.dumps(info.get("capabilities"), sort_keys=True)),
            ]
            if run.header is not None:
                h = run.header
                from msibench.scoring.table import scorer_identity

                words, pinned = scorer_identity(h.get("scorer") if isinstance(h.get("scorer"), dict) else None)
                rows += [
                    ("scorer", f"{h.get('scorer_hash')}: {words}" + ("" if pinned else " (NOT the pinned scorers)")),
                    ("scored on", f"{h.get('device')}, {h.get('date')}"),
                ]
            packages = info.get("packages") or {}
            pkg = ", ".join(f"{k} {v}" for k, v in sorted(packages.items()) if v)
            rows.append(("packages", pkg))
            body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
            config = json.dumps(info.get("fingerprint"), indent=1, sort_keys=True, default=str)
            blocks.append(
                f'<details class="meta" data-run="{run.index}"><summary>{_e(run.label)}</summary>'
                f'<table class="kv">{body}</table>'
                f"<details><summary>method config (fingerprint)</summary><pre>{_e(config)}</pre></details></details>"
            )
        return f'<section id="meta"><h2>Run metadata</h2>{"".join(blocks)}</section>'

    def _controls(self) -> str:
        from msibench.scoring.aggregate import METRICS

        tracks = sorted({t.track for t in self.tasks})
        ks = sorted({t.k for t in self.tasks})
        cats = sorted({s.category for t in self.tasks for s in t.subjects})
        present = {m for r in self.runs for row in r.task_values.values() for m in row if m in METRICS}

        def options(values, all_label):
            return f'<option value="">{all_label}</option>' + "".join(
                f'<option value="{_e(v)}">{_e(v)}</option>' for v in values
            )

        # "worst first" is ascending for most metrics, descending for those where lower is better (collapse)
        lower = ' data-lower="1"'
        metric_opts = '<option value="">task order</option>' + "".join(
            f'<option value="{m}"{lower if info.lower_is_better else ""}>{_e(info.label)}</option>'
            for m, info in METRICS.items()
            if m in present
        )
        run_opts = "".join(f'<option value="{r.index}">{_e(r.label)}</option>' for r in self.runs if r.scored)
        run_boxes = "".join(
            f'<label><input type="checkbox" class="f-run" value="{r.index}" checked> {_e(r.label)}</label>'
            for r in self.runs
        )
        return f"""<section id="controls" aria-label="filter and sort">
<label>track <select id="f-track">{options(tracks, "all")}</select></label>
<label>K <select id="f-k">{options(ks, "all")}</select></label>
<label>category <select id="f-cat">{options(cats, "all")}</select></label>
<label>status <select id="f-status"><option value="">any</option><option value="failed">a sample failed</option>
<option value="skipped">a sample skipped</option><option value="unscored">not scored</option></select></label>
<span class="runs">methods {run_boxes}</span>
<label>sort by <select id="s-metric">{metric_opts}</select></label>
<label>of <select id="s-run">{run_opts}</select></label>
<label>minus <select id="s-base"><option value="">nothing</option>{run_opts}</select></label>
<label><select id="s-order"><option value="asc">worst first</option><option value="desc">best first</option>
</select></label>
<label>per page <select id="p-size"><option value="25" selected>25</option><option value="50">50</option>
<option value="100">100</option><option value="0">all</option></select></label>
<span class="pager"><button type="button" id="p-prev" aria-label="previous page">‹</button>
<span id="p-info"></span><button type="button" id="p-next" aria-label="next page">›</button></span>
<span id="count" aria-live="polite">{len(self.tasks)} of {len(self.tasks)} tasks</span>
<span class="legend"><span class="bx-key matched">matched</span><span class="bx-key unmatched">unmatched</span>
<span class="bx-key wrong">wrong category</span><span class="bx-key missing">subject not found</span></span>
</section>"""

    # ------------------------------------------------------------------------------------------------ a task
    def _task(self, task: Task, order: int) -> str:
        per_run: dict[str, Any] = {}
        for run in self.runs:
            samples = [rec for (tid, _), rec in sorted(run.records.items()) if tid == task.id]
            statuses = sorted({str(r.get("status")) for r in samples})
            if run.scored and any(r.get("status") == "ok" and (task.id, r["sample_index"]) not in run.scores
                                  for r in samples):  # fmt: skip
                statuses.append("unscored")
            if not run.scored and samples:
                statuses.append("unscored")
            values = {k: v for k, v in run.task_values.get(task.id, {}).items() if k != "k" and v is not None}
            per_run[str(run.index)] = {"status": statuses, "v": values}
        cats = sorted({s.category for s in task.subjects})
        head = (
            f'<header><h3 id="t-{_e(task.id)}">{_e(task.id)}</h3><span class="tag">{_e(task.track)}</span>'
            f'<span class="tag">K = {task.k}</span></header>'
            f'<p class="prompt">{_e(task.prompt)}</p><p class="bg">background: {_e(task.background)}</p>'
        )
        cols = [self._references(task), self._layout(task)]
        cols += [self._run_column(run, task) for run in self.runs]
        return (
            f'<article class="task" data-id="{_e(task.id)}" data-order="{order}" data-track="{_e(task.track)}" '
            f'data-k="{task.k}" data-cats="{_attr_json(cats)}" data-runs="{_attr_json(per_run)}">'
            f'{head}<div class="cols">{"".join(cols)}</div></article>'
        )

    def _references(self, task: Task) -> str:
        items = []
        for j, s in enumerate(task.subjects):
            path = self.references.get(s.reference.annotation_id)
            if path is not None and self.thumbs.error(self.ref_sha[path]):
                img = f'<div class="noimg" title="{_e(path)}: {_e(self.thumbs.error(self.ref_sha[path]))}">' + (
                    "reference unreadable (msibench data prepare cuts it out again)</div>"
                )
            elif path is not None:
                th = self.thumbs.thumb(self.ref_sha[path])
                img = (
                    f'<img loading="lazy" src="{_e(th.rel)}" width="{th.width}" height="{th.height}" '
                    f'alt="reference {j + 1}: {_e(s.category)}">'
                )
            else:
                img = '<div class="noimg">reference not prepared</div>'
            items.append(
                f'<figure class="ref" style="--c:{subject_color(j)}">{img}'
                f"<figcaption>{_e(s.category)} · z {s.z}</figcaption></figure>"
            )
        return f'<div class="col refs"><h4>references</h4><div class="reflist">{"".join(items)}</div></div>'

    def _layout(self, task: Task) -> str:
        boxes = "".join(
            _box(
                s.box,
                "layout",
                f"{s.category} z{s.z}",
                f"subject {j + 1}: {s.category}, z = {s.z} (higher is nearer)",
                f";--c:{subject_color(j)};z-index:{s.z + 1}",
            )
            for j, s in sorted(enumerate(task.subjects), key=lambda js: js[1].z)
        )
        return f'<div class="col layout"><h4>target layout</h4><div class="cv square">{boxes}</div></div>'

    def _run_column(self, run: RunData, task: Task) -> str:
        samples = [(key, rec) for key, rec in sorted(run.records.items()) if key[0] == task.id]
        if not samples:
            body = '<p class="note">not in this run</p>'
        else:
            body = "".join(self._sample(run, task, key, rec) for key, rec in samples)
        return f'<div class="col run" data-run="{run.index}"><h4>{_e(run.label)}</h4>{body}</div>'

    def _sample(self, run: RunData, task: Task, key: tuple[str, int], gen: dict[str, Any]) -> str:
        status = str(gen.get("status"))
        caption = f"sample {key[1]} · seed {gen.get('seed')}"
        if status != "ok":
            return (
                f'<figure class="sample {_e(status)}"><div class="cv square failed-cv"><span>{_e(status)}</span></div>'
                f"<figcaption>{_e(caption)}</figcaption>"
                f'<p class="reason status-{_e(status)}">{_e(status)}: {_e(gen.get("reason") or "no reason recorded")}'
                "</p></figure>"
            )
        sha = self.image_sha.get((run.index, *key))
        if sha is None:
            return (
                f'<figure class="sample"><div class="cv square failed-cv"><span>image missing</span></div>'
                f'<figcaption>{_e(caption)}</figcaption><p class="reason">{_e(run.path / str(gen.get("image")))} '
                "is missing</p></figure>"
            )
        regenerate = "`msibench run` with the run's options generates it again"
        if self.thumbs.error(sha):
            return (
                f'<figure class="sample"><div class="cv square failed-cv"><span>image unreadable</span></div>'
                f'<figcaption>{_e(caption)}</figcaption><p class="reason status-failed">'
                f"{_e(run.path / str(gen.get('image')))} cannot be read ({_e(self.thumbs.error(sha))}): "
                f"{_e(regenerate)}</p></figure>"
            )
        th = self.thumbs.thumb(sha)
        rec = run.scores.get(key)
        overlay, details = "", ""
        if gen.get("image_sha256") and gen["image_sha256"] != sha:
            details += (
                '<p class="reason status-failed">this file differs from the image recorded at generation (sha256 in '
                f"records.jsonl): {_e(regenerate)}</p>"
            )
        if rec is None:
            details += f'<p class="note">{"not scored" if not run.scored else "not scored yet (re-run score)"}</p>'
        elif rec.get("status") != "ok":
            details += f'<p class="reason status-failed">scoring {_e(rec.get("status"))}: {_e(rec.get("reason"))}</p>'
        else:
            overlay = self._detections(task, rec)
            details += self._scores(task, rec)
            if rec.get("image_sha256") and rec["image_sha256"] != sha:
                details += '<p class="reason status-failed">these scores are of an earlier image: re-run score</p>'

        img = (
            f'<img loading="lazy" src="{_e(th.rel)}" width="{th.width}" height="{th.height}" '
            f'alt="{_e(run.label)} {_e(task.id)} sample {key[1]}">'
        )
        return (
            f'<figure class="sample ok" data-sample="{key[1]}"><div class="cv" style="aspect-ratio:{th.width}/'
            f'{th.height}">{img}{overlay}</div><figcaption>{_e(caption)}</figcaption>{details}</figure>'
        )

    def _detections(self, task: Task, rec: dict[str, Any]) -> str:
        dets, full = classify_detections(task, rec)
        parts = []
        for d in dets:
            score = d.get("score")
            label = f"{d.get('category', '?')}" + (f" {float(score):.2f}" if score is not None else "")
            if d["kind"] == "matched" and d.get("subject") is not None:
                title = f"matched to subject {int(d['subject']) + 1}"
            elif d["kind"] == "unmatched":
                title = "a requested category, matched to no subject"
            else:
                title = "a category the task does not ask for"
            parts.append(_box(d["box"], f"det {d['kind']}", label, title))
        for j, s in enumerate(rec.get("subjects") or []):
            if s.get("matched") is False and "box" in s:
                parts.append(_box(s["box"], "missing", f"{s.get('category')}?", f"subject {j + 1} not found"))
        cls = "" if full else ' data-partial="1"'
        return f'<div class="ov"{cls}>{"".join(parts)}</div>'

    def _scores(self, task: Task, rec: dict[str, Any]) -> str:
        from msibench.scoring.aggregate import METRICS

        metrics = rec.get("metrics") or {}
        cells = []
        for key, info in METRICS.items():
            if key in metrics:
                cells.append(f'<tr data-metric="{key}"><th>{_e(info.label)}</th><td>{_fmt(metrics[key])}</td></tr>')
        if metrics.get("z_pairs"):
            cells.append(
                f"<tr><th>z pairs</th><td>{_fmt(metrics.get('z_correct'), 0)}/{_fmt(metrics['z_pairs'], 0)}</td></tr>"
            )
        subjects = []
        for s in rec.get("subjects") or []:
            bits = []
            if "matched" in s:
                bits.append(f"IoU {float(s.get('iou') or 0):.2f}" if s.get("matched") else "not found")
            for m in ("dino_i", "clip_i"):
                if s.get(m) is not None:
                    bits.append(f"{METRICS[m].label} {float(s[m]):.3f}")
            if s.get("crop"):
                bits.append(f"crop: {s['crop']}")
            subjects.append(f"<li>{_e(s.get('category'))} (z {_e(s.get('z'))}): {_e(', '.join(bits))}</li>")
        reasons = [r for r in (rec.get("reason"), rec.get("layout_reason")) if r]
        _, full = classify_detections(task, rec)
        partial = "" if full else '<p class="note">only matched detections are stored by this scorer version</p>'
        return (
            f'<table class="scores">{"".join(cells)}</table>'
            + (f'<ul class="subjects">{"".join(subjects)}</ul>' if subjects else "")
            + "".join(f'<p class="reason">{_e(r)}</p>' for r in reasons)
            + partial
        )
