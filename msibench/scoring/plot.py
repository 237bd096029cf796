"""Figures from scored runs, written as PNG and PDF.

- :func:`plot_ablation`: the paper's Fig. 5 layout, a grouped bar chart: one group per configuration (in the
  order given), one bar per metric, 95 % bootstrap intervals as error bars.
- :func:`plot_by_k`: each metric against the subject count K (K = 1 is the single-subject track), one line per
  method, with the same intervals.

matplotlib is driven through its object API with the Agg canvas (no pyplot state, no GUI backend) and its bundled
DejaVu font, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from msibench.scoring.aggregate import METRICS, find_group
from msibench.scoring.table import RunResult

ABLATION_METRICS = ("yolo_subj", "yolo_l", "dino_i", "clip_i", "clip_b", "z_acc")
BY_K_METRICS = ("yolo_subj", "yolo_l", "dino_i", "clip_i", "clip_b", "z_acc")


def _outputs(out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".pdf") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")


def _save(fig, out: str | Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    png, pdf = _outputs(out)
    fig.savefig(png, dpi=200, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    return [png, pdf]


def _yerr(stat) -> tuple[float, float]:
    if stat is None or stat.ci_low is None or stat.mean is None:
        return 0.0, 0.0
    return max(stat.mean - stat.ci_low, 0.0), max(stat.ci_high - stat.mean, 0.0)


def _lowest(items, metrics) -> float:
    """0, or a little below the lowest interval end (CLIP-B cosines can be negative)."""
    lows = [0.0]
    for item in items:
        stats = [item] if metrics is None else [item.metrics.get(m) for m in metrics] if item is not None else []
        for s in stats:
            if s is not None and s.mean is not None:
                lows.append(min(s.mean, s.ci_low if s.ci_low is not None else s.mean))
    low = min(lows)
    return 0.0 if low >= 0 else low - 0.05


def plot_ablation(
    runs: Sequence[RunResult],
    out: str | Path,
    *,
    track: str = "multi",
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Grouped bars: x = configurations (``runs`` order), bars = metrics of ``track``; returns [png, pdf]."""
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot ablation needs at least one run")
    groups = [find_group(run.summary, track, None) for run in runs]
    wanted = [m for m in (metrics or ABLATION_METRICS) if track in METRICS[m].tracks]
    present = [m for m in wanted if any(g is not None and m in g.metrics for g in groups)]
    if not present:
        raise ValueError(f"none of the runs has {track}-track scores for {', '.join(wanted)}")
    width = 0.8 / len(present)
    fig = Figure(figsize=(max(5.0, 1.6 * len(runs) + 2.0), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for j, metric in enumerate(present):
        stats = [group.metrics.get(metric) if group is not None else None for group in groups]
        errs = [_yerr(s) for s in stats]
        ax.bar(
            [i - 0.4 + width * (j + 0.5) for i in range(len(groups))],
            [s.mean if s is not None and s.mean is not None else 0.0 for s in stats],
            width=width * 0.95,
            label=METRICS[metric].label,
            yerr=[[e[0] for e in errs], [e[1] for e in errs]],
            capsize=2,
        )
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([run.label for run in runs])
    ax.set_ylabel("score")
    ax.set_ylim(_lowest(groups, present), 1.05)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.legend(ncol=min(len(present), 6), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.set_title(title or f"Ablation ({track}-subject track, 95% bootstrap CI)", fontsize=9)
    return _save(fig, out)


def plot_by_k(runs: Sequence[RunResult], out: str | Path, *, metrics: Sequence[str] | None = None) -> list[Path]:
    """One panel per metric: mean against K per run (K = 1 from the single track); returns [png, pdf]."""
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot by-k needs at least one run")
    panels = []
    for metric in metrics or BY_K_METRICS:
        series = []
        for run in runs:
            points = []
            for group in run.summary:
                if group.k is None or metric not in group.metrics:
                    continue
                points.append((group.k, group.metrics[metric]))
            points.sort(key=lambda p: p[0])
            if points:
                series.append((run.label, points))
        if series:
            panels.append((metric, series))
    if not panels:
        raise ValueError("the runs have no per-K scores to plot")
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows))
    for p, (metric, series) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, p + 1)
        for label, points in series:
            ks = [k for k, _ in points]
            means = [s.mean for _, s in points]
            errs = [_yerr(s) for _, s in points]
            ax.errorbar(
                ks, means, yerr=[[e[0] for e in errs], [e[1] for e in errs]], marker="o", capsize=2, label=label
            )
        ax.set_title(METRICS[metric].label, fontsize=9)
        ax.set_xlabel("subjects K")
        ax.set_xticks(sorted({k for _, pts in series for k, _ in pts}))
        ax.set_ylim(_lowest([s for _, pts in series for _, s in pts], None), 1.05)
        if p == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)
