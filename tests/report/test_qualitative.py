"""``msibench plot qualitative`` over real paste runs: the grid, its sizes and fonts, and the CSV of ids and seeds."""

from __future__ import annotations

import csv

from click.testing import CliRunner
from figure_helpers import check_paper_pdf
from PIL import Image

from msibench.cli import main
from msibench.records import read_records


def test_qualitative_grid_picks_tasks_over_k_and_records_ids_and_seeds(report_runs, tmp_path, coco_root):
    runs = [f"Paste={report_runs['scored']}", f"Limited={report_runs['limited']}", f"White={report_runs['unscored']}"]
    args = ["plot", "qualitative", "--pick", "3", "--out", str(tmp_path / "fig4")]
    for spec in runs:
        args += ["--run", spec]
    res = CliRunner().invoke(main, [*args, "--coco-root", str(coco_root)])
    # Limited skipped K >= 4 and failed one task: --pick only chooses tasks that every run generated
    assert res.exit_code == 0, res.output
    check_paper_pdf(tmp_path / "fig4.pdf", 7.16)
    with Image.open(tmp_path / "fig4.png") as im:
        assert im.width == round(7.16 * 300)
    rows = list(csv.DictReader((tmp_path / "fig4.csv").open()))
    tasks = sorted({r["task_id"] for r in rows})
    assert len(tasks) == 3 and len(rows) == 3 * (2 + len(runs))
    assert {r["track"] for r in rows} == {"single", "multi"}  # spread over the tracks (and K)
    seeds = {(r["task_id"], int(r["sample_index"])): r["seed"] for r in read_records(report_runs["scored"])}
    for r in rows:
        if r["column"] == "run":
            assert r["status"] == "ok" and r["seed"] == str(seeds[(r["task_id"], 0)])
            assert r["image"] == f"images/{r['task_id']}_s0.png"


def test_qualitative_named_tasks_show_failed_and_skipped_cells(report_runs, tmp_path, coco_root):
    limited = {r["task_id"]: r for r in read_records(report_runs["limited"])}
    failed = next(t for t, r in limited.items() if r["status"] == "failed")
    skipped = next(t for t, r in limited.items() if r["status"] == "skipped")
    out = tmp_path / "fig6"
    args = ["plot", "qualitative", "--run", f"A={report_runs['scored']}", "--run", f"B={report_runs['limited']}",
            "--tasks", f"{failed},{skipped}", "--width", "column", "--out", str(out),
            "--coco-root", str(coco_root)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    check_paper_pdf(out.with_suffix(".pdf"), 3.5)
    rows = [r for r in csv.DictReader(out.with_suffix(".csv").open()) if r["label"] == "B"]
    assert [(r["task_id"], r["status"]) for r in rows] == [(failed, "failed"), (skipped, "skipped")]
    assert "simulated out of memory" in rows[0]["reason"]

    res = CliRunner().invoke(main, [*args[:6], "--tasks", "no-such-task", "--out", str(out)])
    assert res.exit_code != 0 and "no-such-task" in res.output

    (tmp_path / "afile").write_text("")  # --out under a file: an error naming it, not a traceback
    res = CliRunner().invoke(main, [*args[:-4], "--out", str(tmp_path / "afile" / "fig"), *args[-2:]])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    assert "--out" in res.output and "cannot write the figure there" in res.output
