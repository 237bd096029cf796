"""``msibench leaderboard``: one static page ranking every scored run found under some folders.

- Runs are found by their ``run.json`` + ``scores.json``; their figures come from each run's ``results.json``
  (:mod:`msibench.scoring.results`; recomputed the same way when it is absent or stale), never re-derived here.
- Runs are grouped by benchmark manifest (sha256) and scorer (hash): figures of another manifest or another scorer
  are not comparable, so each group is a board of its own and nothing is ranked across groups.
- Each board sorts by any metric (click a column head; lower-is-better columns rank ascending first).
- Each board has a pairwise significance matrix per metric: the paired bootstrap of ``msibench compare`` over the
  tasks both runs scored, with a Bonferroni correction over the N(N-1)/2 pairs of the board: each interval is taken
  at confidence 1 - 0.05 / m (m pairs), with at least 20 / (0.05 / m) resamples so its tails are sampled; a pair is
  marked significant when that interval excludes 0.
- Each run links to its report (``msibench report`` of that run, written under ``OUT/reports/`` unless
  ``reports=False``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALPHA = 0.05
MIN_RESAMPLES = 2000


class LeaderboardError(ValueError):
    """Nothing to rank, or a folder that cannot be read; the message names it."""


@dataclass
class BoardRun:
    path: Path
    label: str
    method: str | None
    document: dict[str, Any]
    records: list[dict[str, Any]]
    multi_subset: int | None = None  # the method's max_subjects when below the manifest's largest K
    report: str | None = None  # relative link from the page


@dataclass
class Board:
    manifest: dict[str, Any]
    scorer: dict[str, Any]
    runs: list[BoardRun] = field(default_factory=list)
    matrices: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.manifest.get('sha256')}/{self.scorer.get('hash')}"


@dataclass(frozen=True)
class LeaderboardSummary:
    out: Path
    boards: int
    runs: int
    skipped: tuple[str, ...]


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Scored run folders at or under ``paths`` (sorted, each once), and what was passed over and why."""
    found: dict[Path, None] = {}
    skipped = []
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise LeaderboardError(f"{root}: no such folder")
        candidates = [root] if (root / "run.json").is_file() else sorted(p.parent for p in root.rglob("run.json"))
        for folder in candidates:
            if (folder / "scores.json").is_file():
                found.setdefault(folder.resolve(), None)
            else:
                skipped.append(f"{folder}: not scored (msibench score {folder})")
    return list(found), skipped


def _load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from msibench.scoring.aggregate import aggregate
    from msibench.scoring.results import build_results, read_results
    from msibench.scoring.store import load_scored_run

    scored = load_scored_run(path)
    document = read_results(path)
    if document is None or (document.get("scorer") or {}).get("hash") != scored.header.get("scorer_hash"):
        from collections import Counter

        counts = Counter(str(r.get("status")) for r in scored.records)
        document = build_results(path, scored, aggregate(scored.records), counts)
    return document, scored.records


def _labels(runs: list[BoardRun]) -> None:
    """Method labels made distinct the one way tables and reports do (:func:`msibench.scoring.table.distinct_labels`):
    the configuration's fingerprint where two runs would share one, then ``[i]`` for the same run twice."""
    from msibench.scoring.table import distinct_labels

    labels = distinct_labels([r.label for r in runs], [r.document["run"].get("fingerprint_hash") for r in runs])
    for run, label in zip(runs, labels, strict=True):
        run.label = label


def _significance(board: Board) -> None:
    from msibench.scoring.aggregate import compare

    n = len(board.runs)
    pairs = n * (n - 1) // 2
    if pairs == 0:
        return
    level = ALPHA / pairs
    resamples = max(MIN_RESAMPLES, math.ceil(20 / level))
    matrices: dict[str, dict[str, Any]] = {}
    for i in range(n):
        for j in range(i + 1, n):
            a, b = board.runs[i], board.runs[j]
            for d in compare(a.records, b.records, confidence=1 - level, n_resamples=resamples):
                column = f"{d.track}_{d.metric}"
                m = matrices.setdefault(column, {"cells": {}})
                significant = d.ci_low is not None and (d.ci_low > 0 or d.ci_high < 0)
                cell = {"diff": d.diff, "ci": [d.ci_low, d.ci_high], "n": d.n, "significant": significant}
                m["cells"][f"{i},{j}"] = cell  # row i = A, column j = B: B - A
                m["cells"][f"{j},{i}"] = {**cell, "diff": -d.diff, "ci": [_neg(d.ci_high), _neg(d.ci_low)]}
    board.matrices = matrices
    board.matrices["_correction"] = {"pairs": pairs, "confidence": 1 - level, "resamples": resamples}


def _neg(x: float | None) -> float | None:
    return None if x is None else -x


def build_leaderboard(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    reports: bool = True,
    coco_root: str | Path | None = None,
    title: str | None = None,
    report_builder: Callable[..., Any] | None = None,
) -> LeaderboardSummary:
    """Write ``out/index.html`` (and the runs' reports under ``out/reports/``); see the module docstring."""
    from msibench.scoring.table import METHOD_LABELS, load_run

    run_paths, skipped = find_runs(paths)
    if not run_paths:
        raise LeaderboardError(
            f"no scored run under {', '.join(str(p) for p in paths)}"
            + (f" ({len(skipped)} unscored: score them first)" if skipped else "")
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LeaderboardError(f"--out {out}: exists and is not a folder")
    boards: dict[str, Board] = {}
    for path in run_paths:
        try:
            document, records = _load(path)
        except (ValueError, OSError) as err:  # ScoreError, ResultsError, ManifestError: named by their messages
            skipped.append(f"{path}: {err}")
            continue
        method = document["run"].get("method")
        run = BoardRun(path, METHOD_LABELS.get(str(method), str(method or path.name)), method, document, records)
        result = load_run(str(path))  # what the tables know of the run: its declared subset of the multi track
        run.multi_subset = result.max_subjects if result.multi_subset else None
        board = Board(document["manifest"], document["scorer"])
        boards.setdefault(board.key, board).runs.append(run)
    if not boards:
        raise LeaderboardError("no run could be read: " + "; ".join(skipped))
    out.mkdir(parents=True, exist_ok=True)
    for board in boards.values():
        _labels(board.runs)
        _significance(board)
        if reports:
            build = report_builder
            if build is None:
                from msibench.report.build import build_report as build
            for run in board.runs:
                name = hashlib.sha256(str(run.path).encode()).hexdigest()[:10]
                folder = out / "reports" / f"{run.path.name}-{name}"
                build([f"{run.label}={run.path}"], folder, coco_root=coco_root, workers=1)
                run.report = f"reports/{folder.name}/index.html"
    page = _page(list(boards.values()), skipped, title)
    from msibench.cache import atomic_write_bytes

    atomic_write_bytes(out / "index.html", page.encode("utf-8"))
    return LeaderboardSummary(out, len(boards), sum(len(b.runs) for b in boards.values()), tuple(skipped))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _columns() -> list[tuple[str, str, str, bool]]:
    """(column id, track, metric, lower is better) of Table I, in its order."""
    from msibench.scoring.aggregate import METRICS
    from msibench.scoring.table import COLUMNS

    return [(f"{t}_{m}", t, m, METRICS[m].lower_is_better) for t, m in COLUMNS]


def _scorer_text(scorer: dict[str, Any]) -> str:
    """The scorer's hash and the weights behind it, pinned or local, in the words the tables use
    (:func:`msibench.scoring.table.scorer_identity`)."""
    from msibench.scoring.table import scorer_identity

    words, pinned = scorer_identity(scorer.get("version"))
    verdict = "the pinned default scorers" if pinned else "NOT the pinned default scorers: not comparable with them"
    return f"scorer {scorer.get('hash')}: {words} ({verdict})"


def _board_html(index: int, board: Board) -> str:
    from msibench.scoring.aggregate import METRICS

    columns = _columns()
    manifest = board.manifest
    head = (
        f"<h2>Board {index + 1}: manifest {_e(manifest.get('name'))} (version {_e(manifest.get('version'))}, sha256 "
        f"{_e(str(manifest.get('sha256'))[:12])})</h2><p class='scorer'>{_e(_scorer_text(board.scorer))}</p>"
    )
    ths = "<th data-sort='label' data-type='text'>run</th><th>coverage</th>"
    for col, track, metric, lower in columns:
        arrow = "↓" if lower else "↑"
        ths += (
            f"<th data-sort='{col}' data-lower='{int(lower)}' title='{_e(track)} {_e(METRICS[metric].label)}, "
            f"{'lower' if lower else 'higher'} is better'>{_e(track)}<br>{_e(METRICS[metric].label)} {arrow}</th>"
        )
    rows = []
    for i, run in enumerate(board.runs):
        doc = run.document
        coverage = doc.get("coverage") or {}
        partial = [
            f"{t} {c['tasks_generated']}/{c['tasks']} tasks, {c['images_scored']}/{c['images']} scored"
            for t, c in coverage.items()
            if c.get("generated") and not c.get("complete")
        ]
        cov = "partial: " + "; ".join(partial) if partial else "complete"
        link = f"<a href='{_e(run.report)}'>{_e(run.label)}</a>" if run.report else _e(run.label)
        cells = (
            f"<td data-col='label' data-value='{_e(run.label)}'>{link}<div class='dir'>{_e(run.path)}</div></td>"
            f"<td class='{'partial' if partial else 'complete'}'>{_e(cov)}</td>"
        )
        for col, track, metric, _ in columns:
            stat = ((doc.get("table") or {}).get(track) or {}).get(metric)
            if stat is None or stat.get("mean") is None:
                cells += f"<td data-col='{col}' data-value=''>–</td>"
                continue
            ci = f" [{_fmt(stat['ci_low'])}, {_fmt(stat['ci_high'])}]" if stat.get("ci_low") is not None else ""
            mark = "†" if track == "multi" and run.multi_subset else ""
            cells += (
                f"<td data-col='{col}' data-value='{stat['mean']!r}' title='n = {stat.get('n')} tasks{ci}'>"
                f"{_fmt(stat['mean'])}{mark}<span class='ci'>{_e(ci)}</span></td>"
            )
        rows.append(f"<tr data-run='{i}'>{cells}</tr>")
    table = f"<table class='board'><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    subsets = [
        f"† {_e(r.label)}: multi-track cells computed over a subset, the tasks with K ≤ {r.multi_subset} (the method "
        "declares no more subjects): not comparable with rows over every task."
        for r in board.runs
        if r.multi_subset
    ]
    notes = "".join(f"<p class='note subset'>{s}</p>" for s in subsets)
    return head + table + notes + _matrix_html(board, columns)


def _matrix_html(board: Board, columns) -> str:
    from msibench.scoring.aggregate import METRICS

    correction = board.matrices.get("_correction")
    if correction is None:
        return "<p class='note'>One run: no pairwise comparison.</p>"
    options = []
    blocks = []
    for col, track, metric, lower in columns:
        m = board.matrices.get(col)
        if m is None:
            continue
        options.append(f"<option value='{col}'>{_e(track)} {_e(METRICS[metric].label)}</option>")
        n = len(board.runs)
        head = "<tr><th>A \\ B</th>" + "".join(f"<th>{_e(r.label)}</th>" for r in board.runs) + "</tr>"
        body = []
        for i in range(n):
            tds = []
            for j in range(n):
                cell = m["cells"].get(f"{i},{j}")
                if i == j or cell is None:
                    tds.append("<td class='diag'>·</td>" if i == j else "<td>–</td>")
                    continue
                better = (cell["diff"] < 0) if lower else (cell["diff"] > 0)
                mark = ("better" if better else "worse") if cell["significant"] else "ns"
                lo, hi = cell["ci"]
                tds.append(
                    f"<td class='{mark}' data-significant='{int(cell['significant'])}' "
                    f"title='B − A over {cell['n']} shared tasks; corrected interval [{_fmt(lo, 4)}, {_fmt(hi, 4)}]'>"
                    f"{cell['diff']:+.3f}{' *' if cell['significant'] else ''}</td>"
                )
            body.append(f"<tr><th>{_e(board.runs[i].label)}</th>{''.join(tds)}</tr>")
        blocks.append(
            f"<table class='matrix' data-matrix='{col}' hidden><thead>{head}</thead><tbody>{''.join(body)}</tbody>"
            "</table>"
        )
    note = (
        f"<p class='note'>Cell (A, B) = B − A on the tasks both scored; * = significant after a Bonferroni "
        f"correction over the {correction['pairs']} pairs (paired bootstrap interval at "
        f"{100 * correction['confidence']:.3f} %, {correction['resamples']} resamples, excludes 0). Green: B is "
        "better, red: B is worse.</p>"
    )
    select = f"<label>Significance: <select class='metric'>{''.join(options)}</select></label>"
    return f"<section class='significance'>{select}{note}{''.join(blocks)}</section>"


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .5em;text-align:right}
td[data-col=label],td.complete,td.partial{text-align:left}td.partial{color:#a40}
th[data-sort]{cursor:pointer;background:#f3f3f3}th[data-sort].asc::after{content:" ▲"}
th[data-sort].desc::after{content:" ▼"}.ci{color:#888;font-size:.85em;margin-left:.3em}.dir{color:#888;font-size:.8em}
td.better{background:#d9f2d9}td.worse{background:#f7d4d4}td.ns{color:#666}td.diag{background:#eee}
.scorer,.note,.skipped{color:#555;font-size:.9em}
"""

_JS = """
document.querySelectorAll('table.board').forEach(function (table) {
  table.querySelectorAll('th[data-sort]').forEach(function (th) {
    th.addEventListener('click', function () {
      var col = th.dataset.sort, text = th.dataset.type === 'text';
      var asc = th.classList.contains('asc') ? false : th.classList.contains('desc') ? true
        : (text || th.dataset.lower === '1');
      table.querySelectorAll('th[data-sort]').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.querySelector("td[data-col='" + col + "']").dataset.value;
        var y = b.querySelector("td[data-col='" + col + "']").dataset.value;
        if (x === '' && y === '') return 0;
        if (x === '') return 1;
        if (y === '') return -1;
        var c = text ? x.localeCompare(y) : parseFloat(x) - parseFloat(y);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.querySelectorAll('section.significance').forEach(function (section) {
  var select = section.querySelector('select.metric');
  function show() {
    section.querySelectorAll('table.matrix').forEach(function (t) { t.hidden = t.dataset.matrix !== select.value; });
  }
  select.addEventListener('change', show);
  show();
});
document.body.dataset.ready = '1';
"""


def _page(boards: list[Board], skipped: list[str], title: str | None) -> str:
    title = title or "msibench leaderboard"
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1><p class='note'>{sum(len(b.runs) for b in boards)} scored runs in {len(boards)} "
        f"board(s); runs of different benchmark manifests or scorers are never ranked together. Generated "
        f"{_e(generated)}. Click a column head to sort.</p>",
    ]
    parts += [_board_html(i, b) for i, b in enumerate(boards)]
    if skipped:
        items = "".join(f"<li>{_e(s)}</li>" for s in skipped)
        parts.append(f"<h2>Not ranked</h2><ul class='skipped'>{items}</ul>")
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(parts)
