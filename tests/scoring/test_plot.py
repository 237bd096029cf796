"""Paper figures: sizes, fonts embedded as TrueType, >= 8 pt text, no title, separate axes for CLIP-B, K = 1 not
joined to K = 2..5, offset error bars, "n/a" YOLO-L for a run without layout, and the CSV beside each figure."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from figure_helpers import check_paper_pdf

from msibench.scoring.plot import (
    ablation_figure,
    by_k_figure,
    paper_style,
    plot_ablation,
    plot_by_k,
    run_uses_layout,
)
from msibench.scoring.table import load_run

# (multi means per metric) of four ablation configurations, the first without layout use (paper Fig. 5)
CONFIGS = {
    "Baseline": dict(yolo_subj=0.25, yolo_l=0.05, dino_i=0.35, clip_i=0.6, clip_b=0.29, z=0.3, layout=False),
    "+ML": dict(yolo_subj=0.8, yolo_l=0.85, dino_i=0.45, clip_i=0.68, clip_b=0.24, z=0.6, layout=True),
    "+DST": dict(yolo_subj=0.82, yolo_l=0.86, dino_i=0.52, clip_i=0.72, clip_b=0.26, z=0.65, layout=True),
    "+CLSQ": dict(yolo_subj=0.9, yolo_l=0.93, dino_i=0.6, clip_i=0.78, clip_b=0.31, z=0.7, layout=True),
}


def write_run(path: Path, means: dict, seed: int, n_per_k: int = 6) -> Path:
    """A scored run folder (run.json, records.jsonl, scores.json, scores.jsonl) with per-task values around
    ``means``."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    caps = {"max_subjects": 5, "uses_layout": means["layout"], "uses_zorder": means["layout"], "tracks": ["multi"]}
    (path / "run.json").write_text(json.dumps({"method": "mscustomnet", "capabilities": caps}))
    header = {"format": "msibench-scores", "scorer_hash": "h", "scorer": {}, "run": {"method": "mscustomnet"}}
    (path / "scores.json").write_text(json.dumps(header))

    def jitter(v, k=1):
        return float(np.clip(v - 0.03 * (k - 2) + rng.normal(0, 0.05), 0, 1))

    with open(path / "scores.jsonl", "w") as f, open(path / "records.jsonl", "w") as gen:
        for i in range(n_per_k):
            # the generation records the scores belong to (scores are only read against them)
            for task, track, k in [(f"s{i}", "single", 1), *((f"m{k}-{i}", "multi", k) for k in (2, 3, 4, 5))]:
                gen.write(json.dumps({"task_id": task, "track": track, "k": k, "sample_index": 0, "status": "ok"}))
                gen.write("\n")
            m = {x: jitter(means[x]) for x in ("dino_i", "clip_i")}
            m["clip_b"] = float(means["clip_b"] + rng.normal(0, 0.01))
            f.write(json.dumps({"task_id": f"s{i}", "track": "single", "k": 1, "sample_index": 0, "status": "ok",
                                "scorer": "h", "metrics": m}) + "\n")  # fmt: skip
            for k in (2, 3, 4, 5):
                m = {x: jitter(means[x], k) for x in ("yolo_subj", "yolo_l", "dino_i", "clip_i")}
                m["clip_b"] = float(means["clip_b"] + rng.normal(0, 0.01))
                pairs = k - 1
                m.update(z_pairs=pairs, z_correct=int(rng.binomial(pairs, means["z"])))
                f.write(json.dumps({"task_id": f"m{k}-{i}", "track": "multi", "k": k, "sample_index": 0,
                                    "status": "ok", "scorer": "h", "metrics": m}) + "\n")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def ablation_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ablation")
    return [load_run(f"{label}={write_run(base / label, m, i)}") for i, (label, m) in enumerate(CONFIGS.items())]


def texts_of(fig):
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_ablation_figure_is_fit_for_a_paper(ablation_runs, tmp_path):
    for width, inches in (("column", 3.5), ("page", 7.16)):
        png, pdf, table = plot_ablation(ablation_runs, tmp_path / f"fig5-{width}", width=width)
        check_paper_pdf(pdf, inches)
        from PIL import Image

        with Image.open(png) as im:
            assert im.width == round(inches * 300)
        rows = list(csv.DictReader(table.open()))
        assert {r["label"] for r in rows} == set(CONFIGS)
        baseline = {r["metric"]: r for r in rows if r["label"] == "Baseline"}
        assert baseline["yolo_l"]["shown"] == "n/a" and baseline["yolo_l"]["mean"] == ""
        assert baseline["yolo_subj"]["shown"] == "bar" and float(baseline["yolo_subj"]["mean"]) > 0
        full = {r["metric"]: r for r in rows if r["label"] == "+CLSQ"}
        assert float(full["yolo_l"]["ci_low"]) < float(full["yolo_l"]["mean"]) < float(full["yolo_l"]["ci_high"])


def test_ablation_layout_no_title_and_clip_b_on_its_own_axis(ablation_runs):
    with paper_style():
        fig, rows = ablation_figure(ablation_runs, width="column")
        texts = texts_of(fig)
        assert min(t.get_fontsize() for t in texts) >= 8
        assert all(ax.get_title() == "" for ax in fig.axes) and fig._suptitle is None
        main_ax, clip_ax = fig.axes[:2]  # bars on top; CLIP-B under them, same x, its own y axis
        assert main_ax.get_position().y0 > clip_ax.get_position().y1
        assert "CLIP-B" in clip_ax.get_ylabel() and "CLIP-B" not in main_ax.get_ylabel()
        assert main_ax.get_ylim() == (0.0, 1.0)
        lo, hi = clip_ax.get_ylim()
        assert 0.15 < lo and hi < 0.45  # zoomed to the CLIP-B values, not squeezed into 0-1
        # the layout-free baseline has no YOLO-L bar but an "n/a" at its place
        assert [t.get_text() for t in main_ax.texts] == ["n/a"]
        yolo_l = next(c for c in main_ax.containers if c.get_label() == "YOLO-L")
        assert len(yolo_l.patches) == len(ablation_runs) - 1


def test_run_uses_layout_reads_capabilities_then_the_config(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "run.json").write_text(json.dumps({"capabilities": {"uses_layout": False}}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text(json.dumps({"fingerprint": {"config": {"use_layout": True}}}))
    assert run_uses_layout(tmp_path / "a") is False
    assert run_uses_layout(tmp_path / "b") is True
    assert run_uses_layout(tmp_path / "missing") is None
    (tmp_path / "c").mkdir()
    training = {"fingerprint": {"config": {"training": {"use_layout": False}}}}
    (tmp_path / "c" / "run.json").write_text(json.dumps(training))
    assert run_uses_layout(tmp_path / "c") is False


def test_by_k_keeps_k1_apart_and_offsets_error_bars(ablation_runs, tmp_path):
    runs = ablation_runs[1:]
    png, pdf, table = plot_by_k(runs, tmp_path / "by_k", width="column")
    check_paper_pdf(pdf, 3.5)
    png2, pdf2, _ = plot_by_k(runs, tmp_path / "by_k_page", width="page")
    check_paper_pdf(pdf2, 7.16)
    rows = list(csv.DictReader(table.open()))
    dino = [r for r in rows if r["metric"] == "dino_i"]
    assert {(r["track"], r["k"]) for r in dino} >= {("single", "1"), ("multi", "2"), ("multi", "5")}
    # the runs are drawn side by side at each K: distinct x, all within 0.5 of K
    for k in ("1", "2", "5"):
        xs = [float(r["x"]) for r in dino if r["k"] == k]
        assert len(set(xs)) == len(runs) and all(abs(x - int(k)) < 0.5 for x in xs)
    with paper_style():
        fig, _ = by_k_figure(runs, width="column")
        assert min(t.get_fontsize() for t in texts_of(fig)) >= 8
        assert all(ax.get_title() == "" for ax in fig.axes) and fig._suptitle is None
        for ax in fig.axes:
            for line in ax.get_lines():
                xs = np.asarray(line.get_xdata(), dtype=float)
                joined = len(set(xs.tolist())) > 1 and line.get_linestyle() not in ("None", "none", "")
                if joined:  # a series' line (the dotted K = 1 | K >= 2 separator is vertical: one x)
                    assert xs.min() > 1.5, "K = 1 is joined by a line to K >= 2"
        clip_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "CLIP-B")
        lo, hi = clip_ax.get_ylim()
        assert 0.15 < lo and hi < 0.45


def test_by_k_shows_identity_collapse_per_k_by_default(tmp_path):
    """Identity collapse is reported per K with its interval, like every other metric of the multi track."""
    run = write_run(tmp_path / "run", CONFIGS["+CLSQ"], 0)
    lines = []
    for line in (run / "scores.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["track"] == "multi":  # one confused subject of K at K = 4 and 5, none below
            rec["metrics"].update(collapse_subjects=rec["k"], collapse_confused=int(rec["k"] >= 4))
        lines.append(json.dumps(rec))
    (run / "scores.jsonl").write_text("\n".join(lines) + "\n")
    with paper_style():
        _, rows = by_k_figure([load_run(f"x={run}")])
    collapse = {int(r["k"]): r for r in rows if r["metric"] == "collapse"}
    assert set(collapse) == {2, 3, 4, 5}
    assert collapse[2]["mean"] == 0.0 and collapse[4]["mean"] == pytest.approx(0.25)
    assert collapse[5]["mean"] == pytest.approx(0.2) and collapse[5]["n"] == 6
