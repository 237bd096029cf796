"""Figures for a paper from run folders, each written as PNG + PDF with a CSV of the plotted values beside it.

- :func:`plot_ablation`: the paper's Fig. 5, grouped bars per configuration (in the order given) with 95 %
  bootstrap intervals. CLIP-B (a text-image cosine around 0.3) gets its own panel and axis beside the 0–1 metrics;
  a run whose method uses no layout (``run.json`` capabilities) shows "n/a" for YOLO-L, as the paper's baseline.
- :func:`plot_by_k`: each metric against the subject count K, one panel (and axis) per metric, one series per run;
  K = 1 (the single-subject track) is a separate point, not joined to K = 2–5, and the series are offset
  sideways so their error bars do not overlap.
- :func:`plot_qualitative`: the paper's Fig. 3 / 4 / 6, a grid with the references and the target layout on the
  left and one column per run, the task ids and seeds in the CSV.

Sizes follow two-column papers: ``width="column"`` (3.5 in) or ``"page"`` (7.16 in); every text is at least
8 pt; the figure has no title (captions belong to the paper); fonts are embedded in PDFs as TrueType (Type 42),
never Type 3. matplotlib is driven through its object API with the Agg canvas and its bundled DejaVu Sans, so
nothing is downloaded and no GUI backend is needed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from msibench.scoring.aggregate import METRICS, Stat, find_group
from msibench.scoring.table import RunResult, check_same_manifest, scorer_identity, with_distinct_labels

ABLATION_METRICS = ("yolo_subj", "yolo_l", "dino_i", "clip_i", "clip_b", "z_acc")
BY_K_METRICS = ("yolo_subj", "yolo_l", "dino_i", "clip_i", "clip_b", "z_acc", "collapse", "collapse_same", "found")
# Metrics not on the 0-1 scale of the others get a panel (and an axis) of their own.
OWN_AXIS_METRICS = ("clip_b",)
LAYOUT_METRICS = ("yolo_l", "yolo_l50")
WIDTHS = {"column": 3.5, "page": 7.16}  # inches: one column / two columns of an IEEE / ACM / CVPR page
FONT_PT = 8.0
DPI = 300
COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")  # Okabe-Ito


def _width(width: str | float) -> float:
    if isinstance(width, str):
        if width not in WIDTHS:
            raise ValueError(f"figure width {width!r}: choose one of {', '.join(WIDTHS)} or a number of inches")
        return WIDTHS[width]
    if width <= 0:
        raise ValueError(f"figure width must be positive, got {width}")
    return float(width)


@contextmanager
def paper_style():
    """rcParams for paper figures: TrueType (Type 42) fonts in PDF/PS, 8 pt everywhere, thin lines."""
    import matplotlib as mpl

    with mpl.rc_context(
        {
            "pdf.fonttype": 42,
            "ps.fonttype": 42,
            "svg.fonttype": "none",
            "font.family": "DejaVu Sans",
            "font.size": FONT_PT,
            "axes.titlesize": FONT_PT,
            "axes.labelsize": FONT_PT,
            "xtick.labelsize": FONT_PT,
            "ytick.labelsize": FONT_PT,
            "legend.fontsize": FONT_PT,
            "legend.title_fontsize": FONT_PT,
            "figure.titlesize": FONT_PT,
            "mathtext.fontset": "dejavusans",
            "axes.linewidth": 0.6,
            "xtick.major.width": 0.6,
            "ytick.major.width": 0.6,
            "lines.linewidth": 1.0,
            "errorbar.capsize": 1.5,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "pdf.compression": 6,
        }
    ):
        yield


def outputs(out: str | Path) -> tuple[Path, Path, Path]:
    """(png, pdf, csv) paths for ``out`` (a stem; a .png/.pdf/.csv suffix is dropped)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".pdf", ".csv") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    return tuple(stem.with_name(stem.name + ext) for ext in (".png", ".pdf", ".csv"))  # type: ignore[return-value]


# Columns every metric figure's CSV adds: what each point covers and which weights scored it.
PROVENANCE_COLUMNS = ("coverage", "scorer_hash", "scorer_weights", "scorer_pinned")


def prepare_runs(runs: Sequence[RunResult]) -> list[RunResult]:
    """The runs a metric figure may draw: one manifest (a v1 and a v2 task may share an id), distinct labels, and a
    partial run's label saying so (its CSV rows carry its coverage)."""
    from dataclasses import replace

    check_same_manifest(runs)
    runs = with_distinct_labels(runs)
    return [replace(r, label=f"{r.label} (partial)") if r.incomplete else r for r in runs]


def provenance(run: RunResult) -> dict[str, Any]:
    words, pinned = scorer_identity(run.scorer)
    return {
        "coverage": run.coverage_note() or ("complete" if run.coverage is not None else "not checked"),
        "scorer_hash": run.scorer_hash,
        "scorer_weights": words,
        "scorer_pinned": str(pinned).lower(),
    }


def provenance_text(runs: Sequence[RunResult]) -> tuple[str, bool]:
    """(the scorers of ``runs`` in words, whether every one is the pinned default)."""
    seen: dict[str | None, tuple[str, bool]] = {}
    for run in runs:
        seen.setdefault(run.scorer_hash, scorer_identity(run.scorer))
    text = "; ".join(f"scorer {h}: {words}" for h, (words, _) in seen.items())
    return text, all(pinned for _, pinned in seen.values())


def _save(
    fig, out: str | Path, rows: list[dict[str, Any]], columns: Sequence[str], runs: Sequence[RunResult] = ()
) -> list[Path]:
    """PNG at 300 dpi and PDF at the figure's exact size (no tight bbox: the width is the column's), and the CSV.

    The scorer weights of ``runs`` go into the PNG (``Description``) and PDF (``Subject``) metadata, as into every
    CSV row; a partial run is labelled so in the figure. (No visible note: a paper figure keeps 8 pt text and no
    title; ``msibench plot`` warns on stderr when the weights are not the pinned defaults.)"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    png, pdf, table = outputs(out)
    text, _ = provenance_text(runs) if runs else ("", True)
    fig.savefig(png, dpi=DPI, metadata={"Software": "msibench", "Description": text} if text else None)
    fig.savefig(pdf, metadata={"CreationDate": None, "Creator": "msibench", **({"Subject": text} if text else {})})
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return [png, pdf, table]


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _yerr(stat: Stat | None) -> tuple[float, float]:
    if stat is None or stat.ci_low is None or stat.mean is None:
        return 0.0, 0.0
    return max(stat.mean - stat.ci_low, 0.0), max(stat.ci_high - stat.mean, 0.0)


def _stat_row(stat: Stat | None) -> dict[str, Any]:
    if stat is None:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": None}
    return {"mean": stat.mean, "ci_low": stat.ci_low, "ci_high": stat.ci_high, "n": stat.n}


def run_uses_layout(run_dir: str | Path) -> bool | None:
    """Whether the run's method used the layout, from its ``run.json`` (declared capabilities, else the method
    config's ``use_layout``); None when the run folder does not say."""
    import json

    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    caps = info.get("capabilities")
    if isinstance(caps, dict) and "uses_layout" in caps:
        return bool(caps["uses_layout"])
    config = (info.get("fingerprint") or {}).get("config") or {}
    for section in (config, config.get("training") or {}):  # mscustomnet records its training switches
        if isinstance(section, dict) and "use_layout" in section:
            return bool(section["use_layout"])
    return None


def _value_limits(stats: Sequence[Stat | None], bounded: bool) -> tuple[float, float]:
    lows, highs = [], []
    for s in stats:
        if s is None or s.mean is None:
            continue
        lows.append(s.ci_low if s.ci_low is not None else s.mean)
        highs.append(s.ci_high if s.ci_high is not None else s.mean)
    if not lows:
        return (0.0, 1.0)
    lo, hi = min(lows), max(highs)
    pad = max(0.05 * (hi - lo), 0.01)
    lo, hi = lo - pad, hi + pad
    if bounded:  # a 0-1 metric: never far beyond its range, but markers at 0 or 1 stay whole
        lo, hi = max(lo, -0.03), min(max(hi, lo + 0.05), 1.03)
    return lo, hi


# ------------------------------------------------------------------------------------------------ ablation


ABLATION_COLUMNS = (
    "label", "run_dir", "track", "metric", "metric_label", "mean", "ci_low", "ci_high", "n", "shown",
    *PROVENANCE_COLUMNS,
)  # fmt: skip


def plot_ablation(runs: Sequence[RunResult], out: str | Path, **options: Any) -> list[Path]:
    """Fig. 5 (see :func:`ablation_figure` for the options); returns [png, pdf, csv]. Runs of different manifests
    are refused; partial runs are labelled so (the CLI refuses them without --allow-partial)."""
    runs = prepare_runs(runs)
    with paper_style():
        fig, rows = ablation_figure(runs, **options)
        by_dir = {(r.run_dir, r.label): r for r in runs}
        rows = [{**row, **provenance(by_dir[(row["run_dir"], row["label"])])} for row in rows]
        return _save(fig, out, rows, ABLATION_COLUMNS, runs)


def ablation_figure(
    runs: Sequence[RunResult],
    *,
    track: str = "multi",
    metrics: Sequence[str] | None = None,
    width: str | float = "column",
    height: float | None = None,
    layout_use: Sequence[bool | None] | None = None,
):
    """Fig. 5: x = configurations (``runs`` order), bars = metrics of ``track``; returns (figure, plotted rows).
    Call it inside :func:`paper_style`.

    ``layout_use`` (per run; default: read from each run's ``run.json``) marks runs whose method uses no layout:
    their YOLO-L is drawn as "n/a" rather than a bar."""
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot ablation needs at least one run")
    groups = [find_group(run.summary, track, None) for run in runs]
    wanted = [m for m in (metrics or ABLATION_METRICS) if track in METRICS[m].tracks]
    present = [m for m in wanted if any(g is not None and m in g.metrics for g in groups)]
    if not present:
        raise ValueError(f"none of the runs has {track}-track scores for {', '.join(wanted)}")
    uses_layout = list(layout_use) if layout_use is not None else [run_uses_layout(r.run_dir) for r in runs]
    if len(uses_layout) != len(runs):
        raise ValueError(f"layout_use has {len(uses_layout)} entries for {len(runs)} runs")
    main = [m for m in present if m not in OWN_AXIS_METRICS]
    side = [m for m in present if m in OWN_AXIS_METRICS]

    def stat_of(i: int, metric: str) -> tuple[Stat | None, str]:
        if metric in LAYOUT_METRICS and uses_layout[i] is False:
            return None, "n/a"
        group = groups[i]
        stat = group.metrics.get(metric) if group is not None else None
        return stat, "bar" if stat is not None and stat.mean is not None else "missing"

    rows: list[dict[str, Any]] = []
    for i, run in enumerate(runs):
        for metric in present:
            stat, shown = stat_of(i, metric)
            rows.append(
                {"label": run.label, "run_dir": run.run_dir, "track": track, "metric": metric,
                 "metric_label": METRICS[metric].label, **_stat_row(stat), "shown": shown}
            )  # fmt: skip

    fig_w = _width(width)
    # CLIP-B and the like: a shorter panel under the bars, same configurations on the same x, its own y axis.
    ratios = ([3.0] if main else []) + ([1.25] if side else [])
    fig_h = height or 0.35 + (2.0 if main else 0.0) + (0.95 if side else 0.0)  # legend + bars + CLIP-B
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    axes = fig.subplots(len(ratios), 1, height_ratios=ratios, sharex=True, squeeze=False)[:, 0]
    handles = []
    if main:
        ax = axes[0]
        width_bar = 0.8 / len(main)
        for j, metric in enumerate(main):
            xs, means, errs, na_xs = [], [], [], []
            for i in range(len(runs)):
                x = i - 0.4 + width_bar * (j + 0.5)
                stat, shown = stat_of(i, metric)
                if shown == "n/a":
                    na_xs.append(x)
                elif shown == "bar":
                    xs.append(x)
                    means.append(stat.mean)
                    errs.append(_yerr(stat))
            color = COLORS[ABLATION_METRICS.index(metric) % len(COLORS)] if metric in ABLATION_METRICS else None
            h = ax.bar(
                xs, means, width=width_bar * 0.92, color=color, label=METRICS[metric].label,
                yerr=[[e[0] for e in errs], [e[1] for e in errs]], error_kw={"elinewidth": 0.6, "capthick": 0.6},
            )  # fmt: skip
            handles.append(h)
            for x in na_xs:
                ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=FONT_PT, color="0.35")
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("score")
        ax.set_xlim(-0.5, len(runs) - 0.5)
    if side:
        ax = axes[-1]
        for j, metric in enumerate(side):
            offset = (j - (len(side) - 1) / 2) * 0.15
            pts = [(i, *stat_of(i, metric)) for i in range(len(runs))]
            pts = [(i, s) for i, s, shown in pts if shown == "bar"]
            ax.errorbar(
                [i + offset for i, _ in pts], [s.mean for _, s in pts],
                yerr=[[_yerr(s)[0] for _, s in pts], [_yerr(s)[1] for _, s in pts]],
                fmt="o", markersize=3.5, color=COLORS[ABLATION_METRICS.index(metric) % len(COLORS)],
                elinewidth=0.8, capthick=0.8, linestyle="none",
            )  # fmt: skip
            lo, hi = _value_limits([s for _, s in pts], bounded=False)
            ax.set_ylim(lo, hi)
        ax.set_ylabel(" / ".join(METRICS[m].label for m in side))
    axes[-1].set_xticks(range(len(runs)))
    axes[-1].set_xticklabels([run.label for run in runs])
    axes[-1].set_xlim(-0.5, len(runs) - 0.5)
    _fit_ticklabels(fig, axes[-1:])
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 5), frameon=False,
                   handlelength=1.0, columnspacing=0.8, handletextpad=0.4)  # fmt: skip
    return fig, rows


def _fit_ticklabels(fig, axes) -> None:
    """Rotate x tick labels that would overlap (long configuration names in a narrow column)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    for ax in axes:
        labels = ax.get_xticklabels()
        boxes = [lab.get_window_extent(renderer) for lab in labels if lab.get_text()]
        ticks_px = ax.get_window_extent(renderer).width / max(len(boxes), 1)
        if boxes and max(b.width for b in boxes) > 0.95 * ticks_px:
            for lab in labels:
                lab.set_rotation(30)
                lab.set_horizontalalignment("right")
                lab.set_rotation_mode("anchor")


# ----------------------------------------------------------------------------------------------------- by K


BY_K_COLUMNS = (
    "label", "run_dir", "track", "k", "metric", "metric_label", "mean", "ci_low", "ci_high", "n", "x",
    *PROVENANCE_COLUMNS,
)  # fmt: skip


def plot_by_k(runs: Sequence[RunResult], out: str | Path, **options: Any) -> list[Path]:
    """Metrics against K (see :func:`by_k_figure` for the options); returns [png, pdf, csv]. Runs of different
    manifests are refused; partial runs are labelled so (the CLI refuses them without --allow-partial)."""
    runs = prepare_runs(runs)
    with paper_style():
        fig, rows = by_k_figure(runs, **options)
        by_dir = {(r.run_dir, r.label): r for r in runs}
        rows = [{**row, **provenance(by_dir[(row["run_dir"], row["label"])])} for row in rows]
        return _save(fig, out, rows, BY_K_COLUMNS, runs)


def by_k_figure(runs: Sequence[RunResult], *, metrics: Sequence[str] | None = None, width: str | float = "column"):
    """One panel per metric: mean against K per run, K = 1 (single track) apart; returns (figure, plotted rows).
    Call it inside :func:`paper_style`."""
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot by-k needs at least one run")
    for metric in metrics or ():
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    panels = []
    for metric in metrics or BY_K_METRICS:
        series = []
        for i, run in enumerate(runs):
            points = sorted(
                ((g.k, g.track, g.metrics[metric]) for g in run.summary if g.k is not None and metric in g.metrics),
                key=lambda p: (p[0], p[1]),
            )
            points = [p for p in points if p[2].mean is not None]
            if points:
                series.append((i, run, points))
        if series:
            panels.append((metric, series))
    if not panels:
        raise ValueError("the runs have no per-K scores to plot")

    n_runs = len(runs)
    dodge = min(0.12, 0.6 / max(n_runs, 1))
    rows: list[dict[str, Any]] = []
    fig_w = _width(width)
    cols = 2 if fig_w < 5 else 3
    cols = min(cols, len(panels))
    nrows = math.ceil(len(panels) / cols)
    panel_h = 1.25 if fig_w < 5 else 1.55
    fig = Figure(figsize=(fig_w, panel_h * nrows + 0.35), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    handles: dict[str, Any] = {}
    for p, (metric, series) in enumerate(panels):
        ax = axes[p // cols][p % cols]
        all_ks = sorted({k for _, _, pts in series for k, _, _ in pts})
        for i, run, points in series:
            color = COLORS[i % len(COLORS)]
            dx = (i - (n_runs - 1) / 2) * dodge
            single = [(k, s) for k, track, s in points if track == "single"]
            multi = [(k, s) for k, track, s in points if track != "single"]
            for part, line in ((single, "none"), (multi, "-")):
                if not part:
                    continue
                xs = [k + dx for k, _ in part]
                h = ax.errorbar(
                    xs, [s.mean for _, s in part],
                    yerr=[[_yerr(s)[0] for _, s in part], [_yerr(s)[1] for _, s in part]],
                    marker="o", markersize=3, linestyle=line, color=color, elinewidth=0.7, capthick=0.7,
                )  # fmt: skip
                handles.setdefault(run.label, h)
            for (k, track, s), x in zip(points, [k + dx for k, _, _ in points], strict=True):
                rows.append(
                    {"label": run.label, "run_dir": run.run_dir, "track": track, "k": k, "metric": metric,
                     "metric_label": METRICS[metric].label, **_stat_row(s), "x": round(x, 4)}
                )  # fmt: skip
        if 1 in all_ks and any(k > 1 for k in all_ks):
            ax.axvline(1.5, color="0.6", linewidth=0.5, linestyle=":")
        ax.set_xticks(all_ks)
        ax.set_xticklabels([f"{k}" for k in all_ks])
        ax.set_xlim(min(all_ks) - 0.5, max(all_ks) + 0.5)
        ax.set_ylabel(METRICS[metric].label)
        stats = [s for _, _, pts in series for _, _, s in pts]
        ax.set_ylim(*_value_limits(stats, bounded=metric not in OWN_AXIS_METRICS))
    for p in range(len(panels), nrows * cols):
        axes[p // cols][p % cols].set_visible(False)
    any_single = any(track == "single" for _, series in panels for _, _, pts in series for _, track, _ in pts)
    fig.supxlabel("subjects K" + (" (K = 1: the single-subject track)" if any_single else ""), fontsize=FONT_PT)
    n = len(handles)
    fig.legend(handles=list(handles.values()), labels=list(handles), loc="outside upper center",
               ncol=n if n <= (3 if fig_w < 5 else 6) else math.ceil(n / 2), frameon=False, handlelength=1.5,
               columnspacing=1.0)  # fmt: skip
    return fig, rows


# --------------------------------------------------------------------------------------------- qualitative


QUALITATIVE_COLUMNS = (
    "row", "task_id", "track", "k", "categories", "prompt", "column", "label", "run_dir", "sample_index", "seed",
    "status", "image", "reason",
)  # fmt: skip


def pick_tasks(candidates: Sequence[Any], n: int, seed: int = 0) -> list[Any]:
    """``n`` tasks spread over (track, K): round-robin over the groups, a seeded random task of each in turn."""
    import random

    if n < 1:
        raise ValueError(f"--pick must be at least 1, got {n}")
    groups: dict[tuple[str, int], list[Any]] = {}
    for task in candidates:
        groups.setdefault((task.track, task.k), []).append(task)
    rng = random.Random(seed)
    for tasks in groups.values():
        rng.shuffle(tasks)
    order = sorted(groups, key=lambda g: (g[0] != "single", g[1]))
    out: list[Any] = []
    while len(out) < n and any(groups[g] for g in order):
        for g in order:
            if groups[g] and len(out) < n:
                out.append(groups[g].pop())
    position = {t.id: i for i, t in enumerate(candidates)}
    return sorted(out, key=lambda t: ((t.track != "single"), t.k, position[t.id]))


def plot_qualitative(runs: Sequence[tuple[str, str | Path]], out: str | Path, **options: Any) -> list[Path]:
    """Figs. 3 / 4 / 6 (see :func:`qualitative_figure` for the options); returns [png, pdf, csv]."""
    with paper_style():
        fig, rows = qualitative_figure(runs, **options)
        return _save(fig, out, rows, QUALITATIVE_COLUMNS)


def qualitative_figure(
    runs: Sequence[tuple[str, str | Path]],
    *,
    tasks: Sequence[str] | None = None,
    pick: int | None = None,
    seed: int = 0,
    sample: int = 0,
    width: str | float = "page",
    manifest: str | Path | None = None,
    coco_root: str | Path | None = None,
    row_labels: bool = True,
):
    """A grid: references and the target layout on the left, one column per run (LABEL, DIR); one row per task
    (``tasks`` ids, or ``pick`` tasks spread over track and K that every run generated); returns (figure, rows).
    Call it inside :func:`paper_style`."""
    import numpy as np
    from matplotlib.figure import Figure

    from msibench.bench.prepare import PrepareError, missing_references, prepare, reference_paths
    from msibench.records import read_records
    from msibench.scoring.score import resolve_run_manifest
    from msibench.scoring.store import read_run_info

    if not runs:
        raise ValueError("plot qualitative needs at least one --run LABEL=DIR")
    if tasks and pick:
        raise ValueError("give either --tasks or --pick, not both")
    loaded = []
    for label, run_dir in runs:
        path = Path(run_dir)
        info = read_run_info(path)
        bench = resolve_run_manifest(path, info, manifest)
        recs = {(r["task_id"], int(r["sample_index"])): r for r in read_records(path)}
        loaded.append((label, path, bench, recs))
    shas = {b.sha256 for _, _, b, _ in loaded}
    if len(shas) > 1:
        raise ValueError(
            "the runs were made from different benchmark manifests: " + ", ".join(str(p) for _, p, _, _ in loaded)
        )
    bench = loaded[0][2]
    if tasks:
        chosen = []
        for task_id in tasks:
            if task_id not in bench.by_id:
                raise ValueError(f"--tasks: task {task_id!r} is not in manifest {bench.path}")
            if not any((task_id, sample) in recs for _, _, _, recs in loaded):
                raise ValueError(f"--tasks: no run holds sample {sample} of task {task_id!r}")
            chosen.append(bench.by_id[task_id])
    else:
        both = [
            t for t in bench.tasks if all(recs.get((t.id, sample), {}).get("status") == "ok" for *_, recs in loaded)
        ]
        if not both:
            raise ValueError(f"no task has an image of sample {sample} in every run; name tasks with --tasks")
        chosen = pick_tasks(both, pick or 4, seed)
    if missing_references(bench, chosen):
        try:
            prepare(bench, coco_root, tasks=chosen, verify_all=False)
        except PrepareError as err:
            raise ValueError(f"the references of the chosen tasks are not prepared: {err}") from err

    fig_w = _width(width)
    n_cols = 2 + len(loaded)
    left = 0.16 if row_labels else 0.02  # inches for the rotated row labels
    gap = 0.03
    header = 0.2
    cell = (fig_w - left - gap * (n_cols - 1) - 0.02) / n_cols
    if cell < 0.35:
        raise ValueError(f"{n_cols} columns do not fit in {fig_w} in; use --width page or fewer runs")
    fig_h = header + len(chosen) * (cell + gap)
    px = max(64, round(cell * DPI))
    rows: list[dict[str, Any]] = []
    fig = Figure(figsize=(fig_w, fig_h))
    titles = ["References", "Layout"] + [label for label, *_ in loaded]
    for c, title in enumerate(titles):
        x = (left + c * (cell + gap) + cell / 2) / fig_w
        fig.text(x, 1 - (header * 0.5) / fig_h, title, ha="center", va="center", fontsize=FONT_PT)
    for r, task in enumerate(chosen):
        y0 = fig_h - header - (r + 1) * (cell + gap) + gap
        refs = [
            _open_reference(reference_paths(s.reference, bench.sources[s.reference.image_id])) for s in task.subjects
        ]
        cells = [_reference_tile(refs, task, px), _layout_tile(refs, task, px)]
        base = {"row": r, "task_id": task.id, "track": task.track, "k": task.k,
                "categories": "|".join(s.category for s in task.subjects), "prompt": task.prompt}  # fmt: skip
        rows.append({**base, "column": "references"})
        rows.append({**base, "column": "layout"})
        for label, path, _, recs in loaded:
            rec = recs.get((task.id, sample))
            status = rec.get("status") if rec else "missing"
            image = None
            if rec and status == "ok":
                image = _open_image(path / str(rec["image"]), px)
                if image is None:
                    status = "unreadable"
            cells.append(image if image is not None else str(status))
            rows.append(
                {**base, "column": "run", "label": label, "run_dir": str(path), "sample_index": sample,
                 "seed": rec.get("seed") if rec else None, "status": status,
                 "image": rec.get("image") if rec else None, "reason": rec.get("reason") if rec else None}
            )  # fmt: skip
        for c, content in enumerate(cells):
            x0 = left + c * (cell + gap)
            ax = fig.add_axes((x0 / fig_w, y0 / fig_h, cell / fig_w, cell / fig_h))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_linewidth(0.4)
                spine.set_color("0.7")
            if isinstance(content, str):
                ax.set_facecolor("0.92")
                ax.text(0.5, 0.5, content, ha="center", va="center", fontsize=FONT_PT, color="0.3",
                        transform=ax.transAxes)  # fmt: skip
            else:
                ax.imshow(np.asarray(content), interpolation="lanczos")
        if row_labels:
            fig.text((left * 0.45) / fig_w, (y0 + cell / 2) / fig_h, task.id, rotation=90, ha="center",
                     va="center", fontsize=FONT_PT)  # fmt: skip
    return fig, rows


def _open_reference(paths) -> tuple[Any, Any]:
    from PIL import Image

    with Image.open(paths.image) as im:
        rgb = im.convert("RGB")
    with Image.open(paths.mask) as m:
        mask = m.convert("L")
    return rgb, mask


def _open_image(path: Path, px: int):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError:
        return None
    im.thumbnail((px, px), Image.Resampling.LANCZOS)
    return im


def _subject_colors(task) -> list[tuple[int, int, int]]:
    from matplotlib.colors import to_rgb

    return [tuple(round(255 * v) for v in to_rgb(COLORS[j % len(COLORS)])) for j in range(task.k)]


def _reference_tile(refs, task, px: int):
    """The references side by side on white, each framed in its subject's colour (the layout uses the same)."""
    from PIL import Image, ImageDraw

    n = len(refs)
    per_row = math.ceil(math.sqrt(n))
    n_rows = math.ceil(n / per_row)
    slot = px // per_row
    canvas = Image.new("RGB", (px, px), (255, 255, 255))
    top = (px - n_rows * slot) // 2
    draw = ImageDraw.Draw(canvas)
    for j, ((rgb, _), color) in enumerate(zip(refs, _subject_colors(task), strict=True)):
        r, c = divmod(j, per_row)
        inner = max(slot - 8, 4)
        scale = min(inner / rgb.width, inner / rgb.height)  # small cut-outs are enlarged to fill their slot
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        im = rgb.resize(size, Image.Resampling.LANCZOS)
        x0, y0 = c * slot + (slot - im.width) // 2, top + r * slot + (slot - im.height) // 2
        canvas.paste(im, (x0, y0))
        draw.rectangle((c * slot + 1, top + r * slot + 1, (c + 1) * slot - 2, top + (r + 1) * slot - 2),
                       outline=color, width=max(2, px // 120))  # fmt: skip
    return canvas


def _layout_tile(refs, task, px: int):
    """The target layout: references pasted into their boxes back to front by z, boxes outlined in the subject's
    colour."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (px, px), (255, 255, 255))
    colors = _subject_colors(task)
    order = sorted(range(task.k), key=lambda j: task.subjects[j].z)
    for j in order:
        s = task.subjects[j]
        rgb, mask = refs[j]
        x0, y0, x1, y1 = (v * px for v in s.box)
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        scale = min(bw / rgb.width, bh / rgb.height)
        w, h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
        canvas.paste(
            rgb.resize((w, h), Image.Resampling.LANCZOS),
            (round(x0 + (bw - w) / 2), round(y0 + (bh - h) / 2)),
            mask.resize((w, h), Image.Resampling.BILINEAR),
        )
    draw = ImageDraw.Draw(canvas)
    for j in order:
        x0, y0, x1, y1 = (v * px for v in task.subjects[j].box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colors[j], width=max(2, px // 120))
    return canvas
