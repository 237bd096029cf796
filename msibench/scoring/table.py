"""Table I of the paper from scored runs: rows are methods; single-subject DINO-I, CLIP-I, CLIP-B; multi-subject
YOLO-Subj, YOLO-L, DINO-I, CLIP-I, CLIP-B; plus Z-Acc, identity collapse across and within categories (lower is
better) and the found rate (subjects found; one not found scores identity 0), beyond the paper.
``–`` marks a method without a value (as in the paper).

With ``paper=True`` each cell also shows the number the paper reports, read from
``msibench/data/paper_table1.json`` (stored as data with its citation): ``0.613 (0.61)``; ``(?)`` marks a paper
cell we could not read and ``(–)`` one the paper leaves empty. Only a run that IS the paper's configuration of its
method gets them (:func:`paper_match`: the method name, and every field of the entry's ``configuration.fields``
equal in the run's fingerprint, ``run.json`` ``fingerprint.config`` by dotted path); an ablation or a run with
other options shows none, and the paper's numbers get a row of their own.

Only complete rows enter the table: every task of a generated track (one the run has records for) generated, each
with as many samples as the largest ``--seeds`` of the track's records, and every generated image scored.
``allow_partial=True`` shows incomplete rows too, marked in every format with what they cover (md and tex: the label
says ``partial: multi 6/100 tasks, 6/6 images scored``; csv: a ``partial`` column and the counts per track).

Every table also says what produced it: runs of different manifests are refused (:func:`check_same_manifest`), a
note names the scorer weights of each scorer version (:func:`scorer_identity`: pinned or local), multi-track cells
of a method declaring fewer subjects than the manifest holds carry ``†``, and runs of different configurations get
distinct labels (:func:`distinct_labels`); the paper's own rows are labelled ``(paper)``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msibench.scoring.aggregate import METRICS, GroupSummary, Stat, aggregate, find_group

if TYPE_CHECKING:
    from msibench.scoring.store import TrackCoverage

COLUMNS: tuple[tuple[str, str], ...] = (
    ("single", "dino_i"),
    ("single", "clip_i"),
    ("single", "clip_b"),
    ("single", "found"),  # scorer code version 3: subjects found; a subject not found scores identity 0
    ("multi", "yolo_subj"),
    ("multi", "yolo_l"),
    ("multi", "dino_i"),
    ("multi", "clip_i"),
    ("multi", "clip_b"),
    ("multi", "z_acc"),
    ("multi", "collapse"),  # beyond the paper: identity collapse rate, lower is better
    ("multi", "collapse_same"),  # beyond the paper: collapse among same-category subjects, lower is better
    ("multi", "found"),
)
METHOD_LABELS = {
    "paste": "Paste (oracle)",
    "ip-adapter": "IP-Adapter",
    "lambda-eclipse": "λ-ECLIPSE",
    "ssr-encoder": "SSR-Encoder",
    "customnet": "CustomNet",
    "mscustomnet": "MS-CustomNet",
}
PAPER_FILE = "paper_table1.json"
DASH = "–"


class TableError(ValueError):
    """Bad table input (a run spec, a paper file); the message names it."""


@dataclass(frozen=True)
class RunResult:
    label: str
    method: str | None
    run_dir: str
    scorer_hash: str | None
    summary: list[GroupSummary]
    #: the method's fingerprint config from the run folder's run.json (None when absent)
    config: dict[str, Any] | None = None
    coverage: tuple[TrackCoverage, ...] | None = None  # None: not checked (a RunResult built by hand)
    #: the manifest the run was generated from (run.json); runs of different manifests never share a table
    manifest_sha256: str | None = None
    manifest_name: str | None = None
    #: scores.json's scorer version (the weights of every backbone): :func:`scorer_identity` names them
    scorer: dict[str, Any] | None = None
    fingerprint_hash: str | None = None
    #: the method's declared capability and the largest K of the manifest's multi-track tasks: a method declaring
    #: fewer subjects is scored on a subset of the multi track (its cells are marked)
    max_subjects: int | None = None
    manifest_max_k: int | None = None

    @property
    def incomplete(self) -> list[TrackCoverage]:
        """The generated tracks that miss tasks of the manifest or scores of generated images."""
        return [c for c in self.coverage or () if c.generated and not c.complete]

    def coverage_note(self) -> str:
        return ", ".join(c.describe() for c in self.incomplete)

    @property
    def multi_subset(self) -> bool:
        """Whether the multi-track cells cover only the tasks with K <= the method's declared max_subjects."""
        return (
            self.max_subjects is not None
            and self.manifest_max_k is not None
            and self.max_subjects < self.manifest_max_k
        )


@dataclass(frozen=True)
class Cell:
    stat: Stat | None
    paper: float | None = None
    # "reported", "dash" (the paper shows –), "unread", "absent" (method not in the paper), "other-config" (the run
    # is not the paper's configuration of its method); None without --paper
    paper_status: str | None = None


@dataclass(frozen=True)
class Row:
    label: str
    method: str | None
    run_dir: str | None
    cells: tuple[Cell, ...]


def parse_run_spec(spec: str) -> tuple[str | None, Path]:
    """``LABEL=DIR`` or ``DIR``."""
    label, sep, path = spec.partition("=")
    if sep and label and not Path(spec).exists():
        return label, Path(path)
    return None, Path(spec)


def load_run(spec: str | Path, label: str | None = None, manifest: Any = None) -> RunResult:
    """A scored run folder (``LABEL=DIR`` or ``DIR``), aggregated, with its coverage of the manifest (``manifest``:
    a manifest or path to use instead of the run's own, checked against its sha256)."""
    from msibench.scoring.results import groups_from_results, read_results
    from msibench.scoring.store import load_scored_run

    spec_label, path = parse_run_spec(str(spec))
    scored = load_scored_run(path, manifest)
    method = (scored.header.get("run") or {}).get("method")
    label = label or spec_label or METHOD_LABELS.get(str(method), str(method or path.name))
    # The figures the scoring pass stored (results.json) while they describe the current records and scores;
    # recomputed the same way (aggregate) when the file is absent or stale.
    document = read_results(path)
    if document is not None and (document.get("scorer") or {}).get("hash") == scored.header.get("scorer_hash"):
        summary = groups_from_results(document)
    else:
        summary = aggregate(scored.records)
    info = scored.info if isinstance(scored.info, dict) else {}
    caps = info.get("capabilities") if isinstance(info.get("capabilities"), dict) else {}
    max_subjects = caps.get("max_subjects")
    return RunResult(
        label,
        method,
        str(path),
        scored.header.get("scorer_hash"),
        summary,
        config=_run_config(path),
        coverage=scored.coverage,
        manifest_sha256=info.get("manifest_sha256") or (info.get("manifest") or {}).get("sha256"),
        manifest_name=(info.get("manifest") or {}).get("name"),
        scorer=scored.header.get("scorer") if isinstance(scored.header.get("scorer"), dict) else None,
        fingerprint_hash=info.get("fingerprint_hash"),
        max_subjects=max_subjects if isinstance(max_subjects, int) and not isinstance(max_subjects, bool) else None,
        manifest_max_k=scored.max_k,
    )


def check_same_manifest(runs: Sequence[RunResult]) -> None:
    """Refuse runs generated from different benchmark manifests: their tasks differ (a v1 task and a v2 task can
    share an id), so a table, figure or comparison across them would mix two benchmarks."""
    shas = {run.manifest_sha256 for run in runs if run.manifest_sha256}
    if len(shas) > 1:
        listing = "; ".join(
            f"{run.run_dir}: manifest {run.manifest_name or '?'} (sha256 {str(run.manifest_sha256)[:12]})"
            for run in runs
        )
        raise TableError(
            f"the runs were made from different benchmark manifests, their tasks differ: {listing}. "
            "Compare runs of one manifest (msibench run --manifest)."
        )


def distinct_labels(labels: Sequence[str], fingerprints: Sequence[str | None]) -> list[str]:
    """Default labels made distinct: runs that share a label but not a configuration get their fingerprint hash
    appended (``IP-Adapter (1a2b3c4d5e)``); what is still equal (the same run twice) gets ``[i]``."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    out = [f"{lab} ({fp})" if counts[lab] > 1 and fp else lab for lab, fp in zip(labels, fingerprints, strict=True)]
    again: dict[str, int] = {}
    for label in out:
        again[label] = again.get(label, 0) + 1
    return [f"{lab} [{i + 1}]" if again[lab] > 1 else lab for i, lab in enumerate(out)]


def with_distinct_labels(runs: Sequence[RunResult]) -> list[RunResult]:
    from dataclasses import replace

    labels = distinct_labels([r.label for r in runs], [r.fingerprint_hash for r in runs])
    return [r if r.label == lab else replace(r, label=lab) for r, lab in zip(runs, labels, strict=True)]


def _short_weights(identity: Any) -> str:
    """A backbone identity (file name + sha256, hub id @ commit, random + seed) in a few words."""
    import re

    text = str(identity).split("|")[0]
    if text.startswith("random:"):
        return "random " + text.split(":")[1] + " weights"
    found = re.search(r"([^:/|]+):sha256:([0-9a-f]{8})", text)
    if found:
        name = found[1] if found[1] not in ("hf-dir", "file") else "folder"
        return f"{name} sha256:{found[2]}"
    found = re.search(r"([\w.-]+(?:/[\w.-]+)?)@([0-9a-f]{8})", text)
    if found:
        return f"{found[1]}@{found[2]}"
    return text


def scorer_identity(version: dict[str, Any] | None) -> tuple[str, bool]:
    """(the weights that produced a run's scores, in words; whether they are all the pinned defaults).

    Pinned: the detector is the released ``yolo11x-seg.pt`` (its sha256 shown), DINO is facebook/dino-vits16 at the
    pinned commit and CLIP OpenAI's ViT-B/32 at the pinned commit (``msibench weights fetch --scorers``); anything
    else (a local file, another revision, random weights, an injected backbone) is ``local``."""
    if not version:
        return "unknown scorer (scores.json names no weights)", False
    from msibench.scoring.backbones import CLIP_REVISION, DEFAULT_DETECTOR, DEFAULT_DINO, DINO_REVISION

    parts, pinned = [], True
    detector = version.get("detector")
    if isinstance(detector, dict):
        ident = str(detector.get("identity") or detector.get("weights") or "?")
        ok = ident.startswith(f"ultralytics:{DEFAULT_DETECTOR}:sha256:")
        parts.append(f"detector {_short_weights(ident)} ({'pinned' if ok else 'local'})")
        pinned &= ok
    for key, label, ok_prefix in (
        ("dino", "DINO", f"hf:{DEFAULT_DINO}@{DINO_REVISION}"),
        ("clip", "CLIP", None),
    ):
        ident = version.get(key)
        if ident is None:
            continue
        text = str(ident)
        ok = text.startswith(ok_prefix) if ok_prefix else f":openai@{CLIP_REVISION}" in text.split("|")[0]
        parts.append(f"{label} {_short_weights(text)} ({'pinned' if ok else 'local'})")
        pinned &= ok
    if not parts:
        return "no backbone recorded", False
    return ", ".join(parts), pinned


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = (info.get("fingerprint") or {}).get("config") if isinstance(info, dict) else None
    return config if isinstance(config, dict) else None


_MISSING = object()


def _dotted(config: dict[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def paper_match(paper: dict[str, Any], run: RunResult) -> tuple[bool, str]:
    """Whether ``run`` is the paper's configuration of its method, and if not, why (for the table's notes).

    The paper entry's ``configuration.fields`` maps dotted paths of the fingerprint config to the values that define
    the paper's configuration; every one must be present and equal (numbers compared as numbers)."""
    entry = (paper.get("methods") or {}).get(run.method or "")
    if entry is None:
        return False, "not in the paper"
    fields = (entry.get("configuration") or {}).get("fields") or {}
    if fields and run.config is None:
        return False, "its run.json (the method's configuration) was not found"
    for path, want in fields.items():
        got = _dotted(run.config or {}, path)
        same = got == want if not isinstance(want, float) else isinstance(got, (int, float)) and float(got) == want
        if got is _MISSING or not same:
            shown = "absent" if got is _MISSING else repr(got)
            return False, f"{path} = {shown}, the paper's configuration has {want!r}"
    return True, ""


def load_paper_table(path: str | Path | None = None) -> dict[str, Any]:
    if path is None:
        blob = (resources.files("msibench") / "data" / PAPER_FILE).read_text(encoding="utf-8")
        where = PAPER_FILE
    else:
        blob = Path(path).read_text(encoding="utf-8")
        where = str(path)
    try:
        data = json.loads(blob)
    except json.JSONDecodeError as err:
        raise TableError(f"{where}: not valid JSON: {err}") from err
    if not isinstance(data.get("methods"), dict):
        raise TableError(f"{where}: field 'methods' must be an object")
    return data


def paper_cell(paper: dict[str, Any], method: str | None, track: str, metric: str) -> tuple[float | None, str]:
    entry = (paper.get("methods") or {}).get(method or "")
    if entry is None:
        return None, "absent"
    cells = entry.get(track) or {}
    value = cells.get(metric)
    if value is not None:
        return float(value), "reported"
    # listed as empty, or a column the paper does not have at all (identity collapse is msibench's own)
    if f"{track}.{metric}" in (entry.get("dash") or []) or metric not in cells:
        return None, "dash"
    return None, "unread"


def build_rows(runs: Sequence[RunResult], paper: dict[str, Any] | None = None) -> list[Row]:
    rows = []
    covered = set()
    for run in runs:
        matched = paper is not None and paper_match(paper, run)[0]
        if matched:
            covered.add(run.method)
        cells = []
        for track, metric in COLUMNS:
            group = find_group(run.summary, track, None)
            stat = group.metrics.get(metric) if group is not None else None
            if paper is None:
                cells.append(Cell(stat))
            elif matched or paper_cell(paper, run.method, track, metric)[1] == "absent":
                cells.append(Cell(stat, *paper_cell(paper, run.method, track, metric)))
            else:
                cells.append(Cell(stat, None, "other-config"))
        rows.append(Row(run.label, run.method, run.run_dir, tuple(cells)))
    if paper is not None:
        # Methods the paper reports numbers for but no run of the paper's configuration covers still get a row,
        # with only the paper's numbers.
        for method, entry in (paper.get("methods") or {}).items():
            if method in covered:
                continue
            cells = tuple(Cell(None, *paper_cell(paper, method, t, m)) for t, m in COLUMNS)
            if any(c.paper_status == "reported" for c in cells):
                label = entry.get("label") or METHOD_LABELS.get(method, method)
                rows.append(Row(f"{label} (paper)", method, None, cells))
    return rows


def check_complete(runs: Sequence[RunResult], allow_partial: bool) -> None:
    """Refuse incomplete runs (see the module docstring) unless ``allow_partial``."""
    partial = [run for run in runs if run.incomplete]
    if partial and not allow_partial:
        details = "; ".join(f"{run.run_dir}: {run.coverage_note()}" for run in partial)
        raise TableError(
            f"incomplete runs would enter the table as full rows ({details}). Finish them (`msibench run` and "
            "`msibench score` with the same options), or pass --allow-partial to show them marked with their coverage."
        )


def _row_label(row: Row, runs: Sequence[RunResult], with_paper: bool = False) -> str:
    run = _run_of(row, runs)
    if run is None:
        return row.label
    label = row.label
    if with_paper and not scorer_identity(run.scorer)[1]:
        label += " (NOT the pinned scorers)"  # beside the paper's numbers: say loudly that they are not comparable
    if run.incomplete:
        label += f" (partial: {run.coverage_note()})"
    return label


def _fmt(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _cell_text(cell: Cell, digits: int, ci: bool, with_paper: bool) -> str:
    text = _fmt(cell.stat.mean if cell.stat else None, digits)
    if ci and cell.stat is not None and cell.stat.ci_low is not None:
        text += f" [{cell.stat.ci_low:.{digits}f}, {cell.stat.ci_high:.{digits}f}]"
    if with_paper:
        if cell.paper_status == "reported":
            text += f" ({cell.paper:.2f})"
        elif cell.paper_status == "dash":
            text += f" ({DASH})"
        elif cell.paper_status == "unread":
            text += " (?)"
    return text


def _headers() -> list[str]:
    return [f"{'Single' if t == 'single' else 'Multi'} {METRICS[m].label}" for t, m in COLUMNS]


def render_table(
    runs: Sequence[RunResult],
    fmt: str = "md",
    *,
    paper: dict[str, Any] | None = None,
    digits: int = 3,
    ci: bool = False,
    allow_partial: bool = False,
) -> str:
    """Table I as Markdown (``md``), LaTeX (``tex``), CSV (``csv``, full precision, CIs and n included) or an HTML
    ``<table>`` fragment (``html``, for ``msibench report``).

    Incomplete runs are refused unless ``allow_partial`` (see the module docstring)."""
    if isinstance(digits, bool) or not isinstance(digits, int) or not 0 <= digits <= 12:
        raise TableError(f"digits must be an integer in 0..12, got {digits!r}")
    check_complete(runs, allow_partial)
    check_same_manifest(runs)
    runs = with_distinct_labels(runs)
    rows = build_rows(runs, paper)
    if fmt == "csv":
        return _render_csv(rows, runs, paper is not None)
    if fmt == "html":
        return _render_html(rows, runs, _notes(runs, paper), digits, ci, paper is not None)
    if fmt not in ("md", "tex"):
        raise TableError(f"unknown table format {fmt!r}; choose md, tex, csv or html")
    notes = _notes(runs, paper)
    if fmt == "tex":
        return _render_tex(rows, runs, notes, digits, ci, paper is not None)
    texts = [
        [
            _cell_text(c, digits, ci, paper is not None) + _subset_mark(row, track, runs, c)
            for (track, _), c in zip(COLUMNS, row.cells, strict=True)
        ]
        for row in rows
    ]
    lines = ["| Method | " + " | ".join(_headers()) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += [
        f"| {_row_label(row, runs, paper is not None)} | " + " | ".join(t) + " |"
        for row, t in zip(rows, texts, strict=True)
    ]
    return "\n".join(lines + [""] + [f"{n}  " for n in notes]) + "\n"


SUBSET_MARK = "†"


def _run_of(row: Row, runs: Sequence[RunResult]) -> RunResult | None:
    return next((r for r in runs if r.run_dir == row.run_dir and r.label == row.label), None)


def _subset_mark(row: Row, track: str, runs: Sequence[RunResult], cell: Cell) -> str:
    """``†`` on a multi-track cell computed over a subset (the method declares fewer subjects than the manifest
    has): such a method skips the hardest tasks and must not look better for it."""
    run = _run_of(row, runs)
    if cell.stat is None or cell.stat.mean is None:  # no value, nothing computed over a subset
        return ""
    return SUBSET_MARK if track == "multi" and run is not None and run.multi_subset else ""


def _best(rows: list[Row]) -> list[float | None]:
    """Per column, the best mean over the run rows (the highest, the lowest where lower is better)."""
    out = []
    for j, (_, metric) in enumerate(COLUMNS):
        means = [
            r.cells[j].stat.mean for r in rows if r.cells[j].stat is not None and r.cells[j].stat.mean is not None
        ]
        if not means:
            out.append(None)
            continue
        out.append(min(means) if METRICS[metric].lower_is_better else max(means))
    return out


def _render_tex(rows, runs, notes, digits: int, ci: bool, with_paper: bool) -> str:
    """booktabs LaTeX: an arrow per column says which way is better, the best value of each column is bold, and
    with ``ci`` the 95 % interval sits on a second, smaller line of the cell (no extra package needed)."""
    labels = [
        _tex(METRICS[m].label) + (r" $\downarrow$" if METRICS[m].lower_is_better else r" $\uparrow$")
        for _, m in COLUMNS
    ]
    n_single, n_multi = _track_spans()
    best = _best(rows)
    lines = [
        r"\begin{tabular}{l" + "c" * len(COLUMNS) + "}",
        r"\toprule",
        # Every multi-track column (the paper's five, Z-Acc and collapse) sits under "Multi-subject".
        rf" & \multicolumn{{{n_single}}}{{c}}{{Single-subject}} & \multicolumn{{{n_multi}}}{{c}}{{Multi-subject}} \\",
        rf"\cmidrule(lr){{2-{1 + n_single}}}\cmidrule(lr){{{2 + n_single}-{1 + n_single + n_multi}}}",
        "Method & " + " & ".join(labels) + r" \\",
        r"\midrule",
    ]
    for row in rows:
        cells = []
        for j, ((track, _), cell) in enumerate(zip(COLUMNS, row.cells, strict=True)):
            mean = cell.stat.mean if cell.stat is not None else None
            text = _tex(_cell_text(cell, digits, False, with_paper) + _subset_mark(row, track, runs, cell))
            if mean is not None and best[j] is not None and round(mean, digits) == round(best[j], digits):
                text = rf"\textbf{{{text}}}"
            if ci and cell.stat is not None and cell.stat.ci_low is not None:
                interval = f"[{cell.stat.ci_low:.{digits}f}, {cell.stat.ci_high:.{digits}f}]"
                text = rf"\begin{{tabular}}[c]{{@{{}}c@{{}}}}{text}\\{{\scriptsize {interval}}}\end{{tabular}}"
            cells.append(text)
        lines.append(_tex(_row_label(row, runs, with_paper)) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"] + [f"% {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _track_spans() -> tuple[int, int]:
    """How many columns the single and the multi track head (COLUMNS lists the single track first)."""
    n_single = sum(1 for track, _ in COLUMNS if track == "single")
    return n_single, len(COLUMNS) - n_single


_TEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}


def _tex(text: str) -> str:
    """Plain text (a label, a cell) as LaTeX: its special characters escaped, λ and – typeset."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append(r"\textbackslash{}")
        elif ch in _TEX_SPECIAL:
            out.append(_TEX_SPECIAL[ch])
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        elif ch == "λ":
            out.append(r"$\lambda$")
        elif ch == SUBSET_MARK:
            out.append(r"$^\dagger$")
        elif ch == DASH:
            out.append("--")
        else:
            out.append(ch)
    return "".join(out)


def _notes(runs: Sequence[RunResult], paper: dict[str, Any] | None) -> list[str]:
    notes = []
    if paper is not None:
        cite = paper.get("citation") or {}
        notes.append(
            f"In parentheses: numbers reported in {cite.get('short', 'the paper')} ({cite.get('url', '')}); "
            "(?) = not read from the paper, (–) = not reported there."
        )
        for run in runs:
            matched, why = paper_match(paper, run)
            if not matched and why != "not in the paper":
                notes.append(
                    f"{run.label}: not the paper's configuration of {run.method} ({why}): no paper numbers beside it."
                )
    hashes = {run.scorer_hash for run in runs}
    if len(hashes) > 1:
        notes.append(f"Warning: runs were scored by different scorer versions: {', '.join(sorted(map(str, hashes)))}.")
    # which weights produced the numbers, per scorer version (a reader must see a local or random backbone)
    by_scorer: dict[str | None, list[RunResult]] = {}
    for run in runs:
        by_scorer.setdefault(run.scorer_hash, []).append(run)
    for scorer_hash, members in by_scorer.items():
        words, pinned = scorer_identity(members[0].scorer)
        who = "" if len(by_scorer) == 1 else f" ({', '.join(r.label for r in members)})"
        notes.append(f"Scorer {scorer_hash}{who}: {words}.")
        if not pinned and paper is not None:
            notes.append(
                f"WARNING: {', '.join(r.label for r in members)} scored with weights other than the pinned default "
                "scorers (`msibench weights fetch --scorers`): not comparable with the paper's numbers."
            )
    for run in runs:
        if run.multi_subset:
            skipped = find_group(run.summary, "multi", None)
            n_skipped = skipped.n_skipped if skipped is not None else 0
            notes.append(
                f"{SUBSET_MARK} {run.label}: multi-track cells computed over a subset, the tasks with K <= "
                f"{run.max_subjects} (the method declares max_subjects = {run.max_subjects}, the manifest goes to K = "
                f"{run.manifest_max_k}; {n_skipped} images skipped): not comparable with rows over every task."
            )
    for run in runs:
        for cov in run.coverage or ():
            if not cov.generated:
                notes.append(f"{run.label}: {cov.track} track not generated ({DASH}).")
        for track in ("single", "multi"):
            counts = find_group(run.summary, track, None)
            if counts is not None and (counts.n_failed or counts.n_skipped):
                notes.append(
                    f"{run.label} ({track}): {counts.n_failed} failed images (a failed generation counts 0, a "
                    f"scoring failure is left out), {counts.n_skipped} skipped (left out)."
                )
        group = find_group(run.summary, "multi", None)
        if group is not None and "z_acc" in group.metrics:
            notes.append(
                f"{run.label}: Z-Acc over {group.metrics['z_acc'].n} tasks with overlapping subjects "
                f"({group.z_tasks_without_overlap} tasks without overlap left out)."
            )
    return notes


def _render_csv(rows: list[Row], runs: Sequence[RunResult], with_paper: bool) -> str:
    header = ["label", "method", "run_dir"]
    for track, metric in COLUMNS:
        base = f"{track}_{metric}"
        header += [base, f"{base}_ci_low", f"{base}_ci_high", f"{base}_n"]
        if with_paper:
            header.append(f"{base}_paper")
    header.append("partial")
    for track in ("single", "multi"):
        header += [f"{track}_tasks", f"{track}_tasks_generated", f"{track}_images", f"{track}_images_scored"]
        header += [f"{track}_samples_per_task", f"{track}_tasks_short"]
    header += ["multi_subset_max_k", "scorer_hash", "scorer_weights", "scorer_pinned", "manifest_sha256"]
    by_run = {(run.run_dir, run.label): run for run in runs}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        out: list[Any] = [row.label, row.method or "", row.run_dir or ""]
        for cell in row.cells:
            s = cell.stat
            out += [_num(s.mean if s else None), _num(s.ci_low if s else None), _num(s.ci_high if s else None)]
            out.append(s.n if s else "")
            if with_paper:
                out.append(_num(cell.paper))
        run = by_run.get((row.run_dir, row.label))
        coverage = {c.track: c for c in (run.coverage or ())} if run is not None else {}
        out.append("" if run is None or run.coverage is None else str(bool(run.incomplete)).lower())
        for track in ("single", "multi"):
            c = coverage.get(track)
            if c is None:
                out += [""] * 6
                continue
            out += [c.tasks, c.tasks_generated, c.images, c.images_scored, c.samples_per_task or "", c.tasks_short]
        if run is None:
            out += ["", "", "", "", ""]
        else:
            words, pinned = scorer_identity(run.scorer)
            subset = run.max_subjects if run.multi_subset else ""
            out += [subset, run.scorer_hash or "", words, str(pinned).lower(), run.manifest_sha256 or ""]
        writer.writerow(out)
    return buf.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _render_html(
    rows: list[Row], runs: Sequence[RunResult], notes: list[str], digits: int, ci: bool, with_paper: bool
) -> str:
    from html import escape

    n_single, n_multi = _track_spans()
    head = (
        f'<tr><th rowspan="2">Method</th><th colspan="{n_single}">Single-subject</th>'
        f'<th colspan="{n_multi}">Multi-subject</th></tr><tr>'
        + "".join(f"<th>{escape(METRICS[m].label)}</th>" for _, m in COLUMNS)
        + "</tr>"
    )
    body = []
    for row in rows:
        cells = []
        for (track, metric), cell in zip(COLUMNS, row.cells, strict=True):
            text = escape(_cell_text(cell, digits, False, with_paper) + _subset_mark(row, track, runs, cell))
            if ci and cell.stat is not None and cell.stat.ci_low is not None:
                text += f'<span class="ci">[{cell.stat.ci_low:.{digits}f}, {cell.stat.ci_high:.{digits}f}]</span>'
            cells.append(f'<td data-col="{track}_{metric}">{text}</td>')
        label = escape(_row_label(row, runs, with_paper))
        body.append(f'<tr data-method="{escape(row.method or "")}"><td>{label}</td>{"".join(cells)}</tr>')
    notes_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return f'<table class="table1"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>' + (
        f'<ul class="table-notes">{notes_html}</ul>' if notes else ""
    )
