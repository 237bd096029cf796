"""Results you can trust (scoring side): no stale, partial, damaged or failed result reaches a table unmarked."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from scoring_helpers import stats_encoder, write_scored_run

from msibench import exitcodes
from msibench.cli import main
from msibench.records import LockBusyError, exclusive_or_busy, read_records
from msibench.scoring.score import score_run
from msibench.scoring.scorer import ScoreConflictError, ScoreError, Scorer, ScorerConfig
from msibench.scoring.store import load_scores
from msibench.scoring.table import TableError, load_run, render_table


def cheap_scorer() -> Scorer:
    """DINO-I on the target boxes with a statistics encoder: no detector, no weights."""
    return Scorer(ScorerConfig(metrics=("dino_i",), identity_crop="target"), dino=stats_encoder())


def _rewrite_records(run_dir: Path, edit) -> None:
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    records = [r for r in (edit(r) for r in records) if r is not None]
    (run_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# ----------------------------------------------------------------------- 1: scores of another run are refused


def test_scores_of_another_generation_run_are_refused(run_copy, coco_root):
    score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    # what an --overwrite before this change left behind: a new run.json beside the old run's scores
    info = json.loads((run_copy / "run.json").read_text())
    info["fingerprint_hash"] = "0123456789"
    (run_copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(ScoreError, match=r"another generation run .*fingerprint_hash.*--rescore"):
        load_run(run_copy)
    with pytest.raises(ScoreConflictError, match="generated again since"):
        score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    res = CliRunner().invoke(main, ["table", str(run_copy)])
    assert res.exit_code == exitcodes.ERROR and "another generation run" in res.output


def test_scores_of_units_the_run_no_longer_holds_are_left_out(run_copy, coco_root):
    score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    gone = sorted(read_records(run_copy), key=lambda r: r["task_id"])[0]["task_id"]
    _rewrite_records(run_copy, lambda r: None if r["task_id"] == gone else r)
    _, records = load_scores(run_copy)
    assert len(records) == 7 and gone not in {r["task_id"] for r in records}


# ---------------------------------------------------------------------- 2: coverage against the manifest


def test_partially_scored_run_is_refused_then_marked_in_every_format(run_copy, coco_root):
    summary = score_run(run_copy, cheap_scorer(), coco_root=coco_root, limit=3, progress=False)
    assert summary.scored == 3
    run = load_run(run_copy)
    assert run.coverage_note() == "single 4/4 tasks, 0/4 images scored, multi 4/4 tasks, 3/4 images scored"
    with pytest.raises(TableError, match="--allow-partial"):
        render_table([run], "md")
    md = render_table([run], "md", allow_partial=True)
    assert "| Paste (oracle) (partial: single 4/4 tasks, 0/4 images scored, multi 4/4 tasks, 3/4 images" in md
    assert "(partial: single 4/4 tasks, 0/4 images scored" in render_table([run], "tex", allow_partial=True)
    row = next(csv.DictReader(io.StringIO(render_table([run], "csv", allow_partial=True))))
    assert row["partial"] == "true"
    assert (row["multi_tasks"], row["multi_images"], row["multi_images_scored"]) == ("4", "4", "3")
    assert (row["single_images"], row["single_images_scored"]) == ("4", "0")
    runner = CliRunner()
    refused = runner.invoke(main, ["table", str(run_copy)])
    assert refused.exit_code == exitcodes.ERROR and "--allow-partial" in refused.output
    shown = runner.invoke(main, ["table", str(run_copy), "--allow-partial"])
    assert shown.exit_code == exitcodes.OK and "partial:" in shown.output
    # once every image is scored the row is complete and unmarked
    score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    complete = load_run(run_copy)
    assert not complete.incomplete and "partial" not in render_table([complete], "md")
    row = next(csv.DictReader(io.StringIO(render_table([complete], "csv"))))
    assert row["partial"] == "false"


def test_partially_generated_run_is_refused(tmp_path):
    from test_scoring_aggregate import RECORDS

    run = write_scored_run(tmp_path / "r", RECORDS, manifest_tasks={"multi": 5})
    result = load_run(run)
    assert [c.describe() for c in result.incomplete] == ["multi 4/9 tasks, 4/4 images scored"]
    with pytest.raises(TableError, match=r"multi 4/9 tasks"):
        render_table([result], "csv")
    # a track the run never generated is not partial: its cells are dashes, and a note says so
    single_only = write_scored_run(tmp_path / "s", [r for r in RECORDS if r["track"] == "single"])
    md = render_table([load_run(single_only)], "md")
    assert "multi track not generated" in md


def test_tasks_missing_some_of_their_samples_make_a_partial_row(run_copy, coco_root):
    """A second seed generated by one shard of two only: every task has a record, every image is scored, but some
    tasks lack their second sample; the row is partial until the other shard ran."""
    from msibench.methods.paste import PasteMethod
    from msibench.runner import run_method

    manifest = json.loads((run_copy / "run.json").read_text())["manifest"]["path"]

    def more(shard):
        kwargs = {"manifest": manifest, "coco_root": coco_root, "progress": False}
        return run_method(PasteMethod(resolution=128), run_dir=run_copy, seeds=2, shard=shard, **kwargs)

    more((0, 2))
    second = {r["task_id"] for r in read_records(run_copy) if r["sample_index"] == 1}
    assert 0 < len(second) < 8  # the shard holds the second sample of some tasks, not of all
    score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    run = load_run(run_copy)
    assert all(c.images_scored == c.images and c.tasks_generated == c.tasks for c in run.coverage)
    short = len({r["task_id"] for r in read_records(run_copy)} - second)
    assert run.incomplete and "of them with fewer than 2 samples" in run.coverage_note()
    assert sum(c.tasks_short for c in run.coverage) == short
    with pytest.raises(TableError, match="with fewer than 2 samples"):
        render_table([run], "md")
    assert "with fewer than 2 samples" in render_table([run], "tex", allow_partial=True)
    row = next(csv.DictReader(io.StringIO(render_table([run], "csv", allow_partial=True))))
    assert row["partial"] == "true" and row["single_samples_per_task"] == row["multi_samples_per_task"] == "2"
    assert int(row["single_tasks_short"]) + int(row["multi_tasks_short"]) == short
    more((1, 2))
    score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    complete = load_run(run_copy)
    assert not complete.incomplete and "partial" not in render_table([complete], "md")


# -------------------------------------------------------------------------- 4 and 10: damaged images


def test_image_changed_after_generation_is_not_scored_until_regenerated(run_copy, coco_root):
    from msibench.methods.paste import PasteMethod
    from msibench.runner import run_method

    gen = sorted(read_records(run_copy), key=lambda r: r["task_id"])[0]
    original = (run_copy / gen["image"]).read_bytes()
    (run_copy / gen["image"]).write_bytes(original[:-100])
    summary = score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    assert (summary.scored, summary.damaged, summary.exit_code) == (7, 1, exitcodes.FAILURES)
    assert summary.failed_recorded == 1
    idle = score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)  # nothing left to score
    assert (idle.scored, idle.damaged, idle.failed_recorded, idle.exit_code) == (0, 1, 1, exitcodes.FAILURES)
    _, records = load_scores(run_copy)
    assert gen["task_id"] not in {r["task_id"] for r in records}  # not a current score of that image
    failed = next(r for r in read_records(run_copy / "scores.jsonl") if r["task_id"] == gen["task_id"])
    assert "changed since it was generated" in failed["reason"] and "msibench run" in failed["reason"]
    # the same run command generates it again, byte for byte; then it is scored
    info = json.loads((run_copy / "run.json").read_text())
    repaired = run_method(
        PasteMethod(resolution=128), run_dir=run_copy, manifest=info["manifest"]["path"], coco_root=coco_root,
        progress=False,
    )  # fmt: skip
    assert repaired.repaired == 1 and (run_copy / gen["image"]).read_bytes() == original
    again = score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    assert (again.scored, again.reused, again.exit_code) == (1, 7, exitcodes.OK)


def test_undecodable_image_is_a_scoring_failure_with_its_reason(run_copy, coco_root):
    import ultralytics.utils.patches  # noqa: F401  (it wraps PIL.Image.open: the path that raised pi_heif errors)

    def garbage(rec):
        if rec["task_id"] == "multi-k2-001":
            (run_copy / rec["image"]).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
            rec["image_sha256"] = hashlib.sha256((run_copy / rec["image"]).read_bytes()).hexdigest()
        return rec

    _rewrite_records(run_copy, garbage)  # as if the method itself had written a broken file
    summary = score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    assert (summary.scored, summary.failed, summary.exit_code) == (7, 1, exitcodes.FAILURES)
    _, records = load_scores(run_copy)
    failed = next(r for r in records if r["status"] == "failed")
    assert failed["task_id"] == "multi-k2-001" and failed["stage"] == "scoring"
    assert "image cannot be decoded: not a readable image" in failed["reason"]


def test_ultralytics_is_kept_offline_and_out_of_the_users_config(tmp_path):
    code = (
        "import msibench, json\n"
        "import ultralytics.utils as u, ultralytics.utils.checks as c\n"
        "print(json.dumps([u.AUTOINSTALL, c.AUTOINSTALL, u.ONLINE, str(u.USER_CONFIG_DIR)]))\n"
    )
    env = {**os.environ, "MSIBENCH_CACHE": str(tmp_path / "cache"), "YOLO_OFFLINE": "0", "YOLO_AUTOINSTALL": "1"}
    env.pop("YOLO_CONFIG_DIR", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    autoinstall, checks_autoinstall, online, config_dir = json.loads(res.stdout.strip().splitlines()[-1])
    assert (autoinstall, checks_autoinstall, online) == (False, False, False)
    assert Path(config_dir).is_relative_to(tmp_path / "cache")


# ------------------------------------------------------------------------------- 7 and 9: one scoring pass


def test_second_scoring_pass_is_refused_and_stale_temp_files_go(run_copy, coco_root):
    with exclusive_or_busy(run_copy / ".score.lock", "scoring", "-"):
        with pytest.raises(LockBusyError, match="scoring of .* is being written by pid"):
            score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    assert not (run_copy / "scores.jsonl").exists()
    stale = run_copy / ".scores.json.k3j4h5.tmp"
    stale.write_text("{")
    score_run(run_copy, cheap_scorer(), coco_root=coco_root, progress=False)
    assert not stale.exists()


# --------------------------------------------------------------------------------- 3 and 11: bad options


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["score", "{run}", "--device", "cuda"], {}, "no CUDA device"),
        (["score", "{run}", "--device", "tpu"], {}, "unknown device"),
        (["score", "{run}", "--conf", "2"], {}, "--conf"),
        (["score", "{run}", "--imgsz", "100"], {}, "multiple of 32"),
        (["score", "{run}", "--batch-size", "0"], {}, "--batch-size"),
        (["score", "{run}", "--limit", "0"], {}, "--limit"),
        (["score", "{run}"], {"WORLD_SIZE": "x"}, "WORLD_SIZE='x'"),
        (["score", "{run}"], {"MSIBENCH_CACHE": "/dev/null/cache"}, "MSIBENCH_CACHE=/dev/null/cache"),
        (["table", "{run}", "--digits", "-1"], {}, "--digits"),
        (["plot", "by-k", "--run", "a={run}", "--width", "nan"], {}, "--width"),
        (["plot", "ablation", "--run", "a={run}", "--width", "-3"], {}, "--width"),
        (["plot", "qualitative", "--run", "a={run}", "--width", "0"], {}, "--width"),
    ],
)
def test_bad_scoring_options_are_usage_errors(run_copy, args, env, message, monkeypatch):
    from msibench import runner

    monkeypatch.setattr(runner, "_cuda_device_count", lambda: 0)
    res = CliRunner().invoke(main, [a.format(run=run_copy) for a in args], env=env)
    assert res.exit_code == exitcodes.USAGE, res.output
    assert message in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback


def test_plot_under_an_existing_file_is_a_clear_error(tmp_path):
    from test_scoring_aggregate import RECORDS

    run = write_scored_run(tmp_path / "r", RECORDS)
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(main, ["plot", "by-k", "--run", f"a={run}", "--out", str(tmp_path / "file" / "fig")])
    assert res.exit_code == exitcodes.ERROR and "cannot write the figure" in res.output
    assert isinstance(res.exception, SystemExit)  # no traceback


def test_contact_sheet_out_under_an_existing_file_is_a_clear_error(run_copy, tmp_path):
    (tmp_path / "file").write_text("x")
    manifest = json.loads((run_copy / "run.json").read_text())["manifest"]["path"]
    out = tmp_path / "file" / "sheet.png"
    res = CliRunner().invoke(main, ["bench", "contact-sheet", "--manifest", manifest, "--out", str(out)])
    assert res.exit_code == exitcodes.ERROR and f"--out {out}: cannot write the contact sheet there" in res.output
    assert isinstance(res.exception, SystemExit), res.output  # no traceback
