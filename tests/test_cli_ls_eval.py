"""``msibench ls tracks|tasks`` and ``msibench eval`` (run + score + Table I, resumable); ``score`` prints the run's
summary."""

from __future__ import annotations

from collections import Counter

from click.testing import CliRunner

from msibench.bench.manifest import load_manifest
from msibench.cli import main
from msibench.scoring.aggregate import METRICS
from msibench.scoring.table import COLUMNS


def test_ls_tasks_lists_id_k_categories_and_prompt_filtered():
    manifest = load_manifest()
    res = CliRunner().invoke(main, ["ls", "tasks", "--track", "multi", "--k", "3"])
    assert res.exit_code == 0, res.output
    header, *lines = res.output.splitlines()
    assert header.split() == ["task", "K", "categories", "prompt"]
    expected = [t for t in manifest.tasks if t.track == "multi" and t.k == 3]
    assert len(lines) == len(expected) > 0
    for line, task in zip(lines, expected, strict=True):
        assert line.startswith(task.id) and line.split()[1] == "3"
        assert ", ".join(s.category for s in task.subjects) in line and line.endswith(task.prompt)
    res = CliRunner().invoke(main, ["ls", "tasks"])
    assert len(res.output.splitlines()) == len(manifest.tasks) + 1
    res = CliRunner().invoke(main, ["ls", "tasks", "--track", "single", "--k", "4"])
    assert res.exit_code != 0 and "no task" in res.output
    res = CliRunner().invoke(main, ["ls", "methods", "--k", "3"])
    assert res.exit_code != 0 and "ls tasks" in res.output


def test_ls_tracks_counts_the_manifest():
    manifest = load_manifest()
    res = CliRunner().invoke(main, ["ls", "tracks"])
    assert res.exit_code == 0, res.output
    for track in ("single", "multi"):
        per_k = Counter(t.k for t in manifest.tasks if t.track == track)
        line = next(line for line in res.output.splitlines() if line.startswith(track))
        assert f"{sum(per_k.values())} tasks" in line
        for k, n in per_k.items():
            assert f"{n} with K={k}" in line
        # the metrics named are Table I's columns of the track, collapse included
        named = line.split("metrics: ", 1)[1].split(", ")
        assert named == [METRICS[m].label for t, m in COLUMNS if t == track]


def test_eval_runs_scores_and_prints_table_one_resumably(tmp_path, coco_root):
    run_dir = tmp_path / "run"
    # the real scorer code path with a randomly initialised YOLO11n-seg (no weights needed), detector metrics only
    args = ["eval", "--method", "paste", "-M", "resolution=64", "--limit", "1", "--run-dir", str(run_dir),
            "--coco-root", str(coco_root), "--device", "cpu", "--no-progress", "--detector", "yolo11n-seg.yaml",
            "--imgsz", "160", "--metrics", "yolo_subj,yolo_l,z_acc"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "2 generated, 0 failed, 0 skipped, 0 already done" in res.output
    assert "2 scored, 0 already current" in res.output
    assert "  multi: 1 tasks, 1 images scored, 0 failed, 0 skipped" in res.output  # score's run summary
    assert "YOLO-Subj 0.000" in res.output  # random weights find nothing at conf 0.25
    table = res.output[res.output.index("Table I") :]
    assert "| Method | Single DINO-I" in table
    assert "| Paste (oracle) (partial: single 1/" in table  # --limit: a subset, marked with its coverage
    assert (run_dir / "scores.json").is_file() and (run_dir / "records.jsonl").is_file()

    again = CliRunner().invoke(main, args)  # resumable: nothing is generated or scored twice
    assert again.exit_code == 0, again.output
    assert "0 generated, 0 failed, 0 skipped, 2 already done" in again.output
    assert "0 scored, 2 already current" in again.output and "| Paste (oracle) (partial:" in again.output

    res = CliRunner().invoke(main, [*args[:-2], "--metrics", "nope"])
    assert res.exit_code == 2 and "--metrics" in res.output


def test_eval_stops_with_exit_4_while_another_process_generates_the_run(tmp_path, coco_root):
    """eval neither scores nor tabulates a run whose shard another process is writing: it exits 4 (busy), the code
    `run` gave, as its help promises (before, it went on to score and exited 1)."""
    from msibench import exitcodes
    from msibench.records import exclusive_or_busy

    run_dir = tmp_path / "run"
    args = ["eval", "--method", "paste", "-M", "resolution=64", "--limit", "1", "--run-dir", str(run_dir)]
    args += ["--coco-root", str(coco_root), "--device", "cpu", "--no-progress", "--detector", "yolo11n-seg.yaml"]
    with exclusive_or_busy(run_dir / ".shard-0-of-1.lock", "test", "-"):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == exitcodes.BUSY, res.output
    assert "being written by" in res.output and "Table I" not in res.output
    assert not (run_dir / "scores.json").exists()
