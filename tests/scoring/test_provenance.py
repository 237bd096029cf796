"""Every output says what produced it and over what (issue 18): one manifest per table, figure and comparison;
self-contained run folders; partial figures marked; scorer weights named; subsets and configurations told apart."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from scoring_helpers import write_scored_run

from msibench import exitcodes
from msibench.cli import main
from msibench.scoring.table import TableError, load_paper_table, load_run, render_table


def _records(prefix: str, track: str, k: int, n: int, value: float = 0.5) -> list[dict]:
    metrics = {"dino_i": value, "clip_i": value, "clip_b": value}
    return [
        {"task_id": f"{prefix}{i}", "track": track, "k": k, "sample_index": 0, "status": "ok", "metrics": metrics}
        for i in range(n)
    ]


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------- 1: one manifest per output


def test_runs_of_different_manifests_are_refused_everywhere(tmp_path):
    a = write_scored_run(tmp_path / "a", _records("s", "single", 1, 3, 0.4))
    b = write_scored_run(tmp_path / "b", _records("s", "single", 1, 3, 0.7), manifest_tasks={"multi": 1})
    assert (
        json.loads((a / "run.json").read_text())["manifest_sha256"]
        != json.loads((b / "run.json").read_text())["manifest_sha256"]
    )
    for args in (
        ["compare", a, b, "--allow-partial"],
        ["table", a, b, "--allow-partial"],
        ["plot", "by-k", "--run", f"A={a}", "--run", f"B={b}", "--out", tmp_path / "f1", "--allow-partial"],
        ["plot", "ablation", "--run", f"A={a}", "--run", f"B={b}", "--track", "single", "--out", tmp_path / "f2",
         "--allow-partial"],
    ):  # fmt: skip
        res = _invoke(*args)
        assert res.exit_code == exitcodes.ERROR, (args, res.output)
        assert "different benchmark manifests" in res.output and str(a) in res.output and str(b) in res.output
    assert not list(tmp_path.glob("f*.png"))
    # one manifest: compare runs and says who scored what
    c = tmp_path / "c"
    shutil.copytree(a, c)
    res = _invoke("compare", a, c)
    assert res.exit_code == 0, res.output
    assert "scorer abc" in res.output


# ------------------------------------------------------------------------------- 7: partial runs marked or refused


def test_compare_and_plots_refuse_partial_runs_or_mark_them(tmp_path):
    a = write_scored_run(tmp_path / "a", _records("s", "single", 1, 3, 0.4), manifest_tasks={"single": 2})
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for args in (
        ["compare", a, b],
        ["plot", "by-k", "--run", f"A={a}", "--run", f"B={b}", "--out", tmp_path / "k"],
        ["plot", "ablation", "--run", f"A={a}", "--track", "single", "--out", tmp_path / "ab"],
    ):
        res = _invoke(*args)
        assert res.exit_code == exitcodes.ERROR and "--allow-partial" in res.output and "3/5 tasks" in res.output
    res = _invoke("compare", a, b, "--allow-partial")
    assert res.exit_code == 0 and "PARTIAL: single 3/5 tasks" in res.output
    res = _invoke("plot", "by-k", "--run", f"A={a}", "--run", f"B={b}", "--out", tmp_path / "k", "--allow-partial")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "k.csv")))
    assert rows and {r["label"] for r in rows} == {"A (partial)", "B (partial)"}
    assert all(r["coverage"].startswith("single 3/5 tasks") and r["n"] for r in rows)


# ------------------------------------------------------------------------------- 6: scorer identity


PINNED = {
    "detector": {"identity": "ultralytics:yolo11x-seg.pt:sha256:" + "ab" * 32},
    "dino": "hf:facebook/dino-vits16@abe3b354cb6a9b6f146096b14a4a9d7eecbcb4bd|imagenet-224-v1",
    "clip": "open_clip:ViT-B-32-quickgelu:openai@a6f597a30f7b82c51704746581f9a4e41421e878|clip-224-v1",
}
LOCAL = {**PINNED, "dino": "file:my_dino.pth:sha256:" + "cd" * 32 + "|imagenet-224-v1"}


def _with_scorer(run: Path, version: dict) -> Path:
    header = json.loads((run / "scores.json").read_text())
    header["scorer"] = version
    (run / "scores.json").write_text(json.dumps(header))
    return run


def test_tables_and_figures_name_the_scorer_weights(tmp_path):
    recs = _records("s", "single", 1, 3) + _records("m", "multi", 2, 2)
    pinned = load_run(_with_scorer(write_scored_run(tmp_path / "p", recs), PINNED))
    local = load_run(_with_scorer(write_scored_run(tmp_path / "l", recs), LOCAL))
    for fmt in ("md", "tex", "html"):
        text = render_table([pinned], fmt)
        assert "yolo11x-seg.pt sha256:abababab (pinned)" in text and "facebook/dino-vits16@abe3b354 (pinned)" in text
        assert "openai@a6f597a3 (pinned)" in text
    row = next(csv.DictReader(io.StringIO(render_table([local], "csv"))))
    assert row["scorer_pinned"] == "false" and "my_dino.pth sha256:cdcdcdcd (local)" in row["scorer_weights"]
    # beside the paper's numbers, a local scorer is flagged on its row and in a warning
    md = render_table([local], "md", paper=load_paper_table())
    assert "Paste (oracle) (NOT the pinned scorers)" in md and "WARNING: Paste (oracle) scored with weights" in md
    assert "(NOT the pinned scorers)" not in render_table([pinned], "md", paper=load_paper_table())
    from msibench.scoring.plot import plot_by_k

    png, pdf, table = plot_by_k([local], tmp_path / "fig")
    rows = list(csv.DictReader(open(table)))
    assert rows and all(r["scorer_pinned"] == "false" and "my_dino.pth" in r["scorer_weights"] for r in rows)
    from PIL import Image

    assert "my_dino.pth" in Image.open(png).info.get("Description", "")


# ------------------------------------------------------------------------------- 7: subsets, 8: labels, TeX


def test_multi_cells_of_a_method_declaring_fewer_subjects_are_marked(tmp_path):
    recs = _records("m", "multi", 2, 2) + _records("n", "multi", 5, 1)
    run = write_scored_run(tmp_path / "r", recs)
    info = json.loads((run / "run.json").read_text())
    info["capabilities"] = {"max_subjects": 3}
    (run / "run.json").write_text(json.dumps(info))
    result = load_run(run)
    assert result.multi_subset and result.manifest_max_k == 5
    md = render_table([result], "md")
    assert "0.500†" in md and "† Paste (oracle): multi-track cells computed over a subset" in md
    assert r"$^\dagger$" in render_table([result], "tex")
    assert next(csv.DictReader(io.StringIO(render_table([result], "csv"))))["multi_subset_max_k"] == "3"
    info["capabilities"] = {"max_subjects": 5}
    (run / "run.json").write_text(json.dumps(info))
    assert "†" not in render_table([load_run(run)], "md")


def test_runs_of_other_configurations_get_distinct_labels(tmp_path):
    recs = _records("s", "single", 1, 2)
    a = write_scored_run(tmp_path / "a", recs)
    b = write_scored_run(tmp_path / "b", recs)
    info = json.loads((b / "run.json").read_text())
    info["fingerprint_hash"] = "fp2"
    (b / "run.json").write_text(json.dumps(info))
    rows = list(csv.DictReader(io.StringIO(render_table([load_run(a), load_run(b)], "csv"))))
    assert [r["label"] for r in rows] == ["Paste (oracle) (fp)", "Paste (oracle) (fp2)"]
    # the same run twice still gets two labels
    rows = list(csv.DictReader(io.StringIO(render_table([load_run(a), load_run(a)], "csv"))))
    assert len({r["label"] for r in rows}) == 2


def test_tex_escapes_labels_and_marks_the_best_values(tmp_path):
    a = load_run("R&D $x\\y=" + str(write_scored_run(tmp_path / "a", _records("s", "single", 1, 2, 0.4))))
    b = load_run("B_2%=" + str(write_scored_run(tmp_path / "b", _records("s", "single", 1, 2, 0.7))))
    tex = render_table([a, b], "tex", ci=True)
    assert r"R\&D \$x\textbackslash{}y" in tex and r"B\_2\%" in tex
    assert r"\textbf{0.700}" in tex and r"\textbf{0.400}" not in tex
    assert r"DINO-I $\uparrow$" in tex and r"Collapse $\downarrow$" in tex
    assert r"{\scriptsize [0.700, 0.700]}" in tex


def test_collapse_beside_the_paper_is_a_dash_not_unread(tmp_path):
    run = load_run(write_scored_run(tmp_path / "a", _records("m", "multi", 2, 2)))
    rows = render_table([run], "md", paper=load_paper_table())
    ms_row = next(line for line in rows.splitlines() if line.startswith("| MS-CustomNet (paper)"))
    assert ms_row.rstrip(" |").endswith("(–)") and "(?)" not in ms_row


def test_render_table_refuses_mixed_manifests(tmp_path):
    a = load_run(write_scored_run(tmp_path / "a", _records("s", "single", 1, 2)))
    b = load_run(write_scored_run(tmp_path / "b", _records("s", "single", 1, 2), manifest_tasks={"multi": 1}))
    with pytest.raises(TableError, match="different benchmark manifests"):
        render_table([a, b], "md", allow_partial=True)


# ------------------------------------------------------------------------------- 2: self-contained run folders
# ------------------------------------------------------------------------------- 5: partial score summaries

CHEAP = ["--metrics", "dino_i", "--identity-crop", "target", "--dino-weights", "random", "--no-progress"]


def _forget_manifest_path(run: Path) -> None:
    """What copying the run folder to another machine does: the recorded manifest path no longer exists."""
    info = json.loads((run / "run.json").read_text())
    info["manifest"]["path"] = "/nonexistent/elsewhere/manifest.json"
    (run / "run.json").write_text(json.dumps(info))


def test_a_moved_run_folder_keeps_working_from_its_own_manifest_copy(run_copy, coco_root, tmp_path):
    info = json.loads((run_copy / "run.json").read_text())
    assert info["manifest"]["copy"] == "manifest.json" and (run_copy / "manifest.json").is_file()
    moved = tmp_path / "other-machine" / "run"
    shutil.move(run_copy, moved)
    _forget_manifest_path(moved)
    res = _invoke("score", moved, *CHEAP, "--coco-root", coco_root, "--limit", "3")
    assert res.exit_code == 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    # the --limit pass: the summary counts what is pending and marks its figures partial
    assert "single: no image scored yet, 4 pending (not scored yet)" in res.output
    assert "1 pending (not scored yet)\n    PARTIAL (multi 4/4 tasks, 3/4 images scored): DINO-I" in res.output
    res = _invoke("score", moved, *CHEAP, "--coco-root", coco_root)
    assert res.exit_code == 0 and "PARTIAL" not in res.output and "0 pending" in res.output
    for args in (["table", moved], ["report", moved, "--out", tmp_path / "rep", "--no-progress"]):
        res = _invoke(*args)
        assert res.exit_code == 0, (args, res.output)
    # a tampered copy is never used: its sha256 is checked against run.json
    (moved / "manifest.json").write_bytes((moved / "manifest.json").read_bytes() + b"\n")
    res = _invoke("table", moved)
    assert res.exit_code == exitcodes.ERROR and "Pass --manifest" in res.output


def test_a_run_made_before_the_copy_gets_one_when_scored_with_manifest(run_copy, coco_root):
    original = Path(json.loads((run_copy / "run.json").read_text())["manifest"]["path"])
    (run_copy / "manifest.json").unlink()
    _forget_manifest_path(run_copy)
    res = _invoke("report", run_copy, "--out", run_copy.parent / "rep", "--no-progress")
    assert res.exit_code == exitcodes.ERROR and "--manifest" in res.output
    with_progress = [a for a in CHEAP if a != "--no-progress"]
    res = _invoke("score", run_copy, *with_progress, "--coco-root", coco_root, "--manifest", original)
    assert res.exit_code == 0, res.output  # scores written, summary printed, no traceback
    # start-up is not silent: each backbone load and the reference features are announced as they happen
    assert "loading the dino weights (random)" in res.output and "dino loaded in" in res.output
    assert "reference features of" in res.output
    assert "single:" in res.output and (run_copy / "manifest.json").is_file()
    assert _invoke("table", run_copy).exit_code == 0
