"""``mscustomnet data build-msi``."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mscustomnet.cli import main
from msibench import exitcodes


def test_build_msi_command(tiny_coco: Path, tiny_build: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "msi"
    args = ["data", "build-msi", "--coco-root", str(tiny_coco), "--out", str(out), "--workers", "2", "--quiet"]
    result = runner.invoke(main, args)
    # the tiny split's photos 5 (missing) and 6 (truncated) are left out, named, exit code 3
    assert result.exit_code == exitcodes.FAILURES, result.output
    assert "000000000005.png" in result.output and "000000000006.png" in result.output
    assert "5 scenes kept (alpha=5, beta=0.015), 3 written, 2 skipped" in result.output
    for name in ("manifest.jsonl", "stats.json", "pool.json", "config.json"):
        assert (out / name).read_bytes() == (tiny_build / name).read_bytes()
    assert len(list((out / "layouts").glob("*.png"))) == 3

    result = runner.invoke(main, args)  # a finished build resumes to the same files
    assert result.exit_code == exitcodes.FAILURES
    assert (out / "stats.json").read_bytes() == (tiny_build / "stats.json").read_bytes()

    result = runner.invoke(main, [*args, "--alpha", "4"])
    assert result.exit_code == 1 and "alpha: 5 -> 4" in result.output

    result = runner.invoke(main, ["data", "build-msi", "--coco-root", str(tiny_coco), "--split", "val2017",
                                  "--out", str(tmp_path / "v")])  # fmt: skip
    assert result.exit_code == 1 and "instances_val2017.json" in result.output

    out4 = tmp_path / "alpha4"
    result = runner.invoke(main, [*args[:5], str(out4), "--alpha", "4", "--pool-size", "2", "--seed", "7", "--quiet"])
    assert result.exit_code == exitcodes.FAILURES, result.output
    config = json.loads((out4 / "config.json").read_text())
    assert (config["alpha"], config["pool_size"], config["seed"]) == (4, 2, 7)
    stats = json.loads((out4 / "stats.json").read_text())
    assert stats["scenes_kept"] == 6 and stats["per_category"]["dog"]["pool"] == 2


def test_help_lists_the_data_group() -> None:
    result = CliRunner().invoke(main, ["data", "--help"])
    assert result.exit_code == 0 and "build-msi" in result.output


def test_help_and_version() -> None:
    from importlib.metadata import version

    for flag in ("-h", "--help"):
        result = CliRunner().invoke(main, [flag])
        assert result.exit_code == 0 and "data" in result.output and "train" in result.output
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mscustomnet, version {version('msibench')}"
    assert CliRunner().invoke(main, ["data", "-h"]).exit_code == 0


def test_data_info_summarizes_a_build_without_writing(tiny_build: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "msi"
    shutil.copytree(tiny_build, folder)
    stats = json.loads((folder / "stats.json").read_text())
    manifest = (folder / "manifest.jsonl").read_bytes()
    result = CliRunner().invoke(main, ["data", "info", str(folder), "--check"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"scenes: {stats['scenes_written']} written of {stats['scenes_kept']} kept" in out
    assert f"subjects: {stats['subjects_written']};" in out
    per_scene = ", ".join(f"{k}:{v}" for k, v in stats["subjects_per_scene"].items())
    assert f"subjects per scene: {per_scene}" in out
    assert f"{stats['captions']['coco']} COCO captions, {stats['captions']['categories']} from category names" in out
    assert "every file the manifest names exists" in out
    # the pools as the reference rule judged them (pool.json verdicts), matching what the build counted
    rule = stats["reference_rule"]
    fallback = rule["pool_references"] - rule["pool_clean"]
    assert f"{rule['pool_references']} references" in out
    assert f"{rule['pool_clean']} clean, {fallback} fallback" in out
    assert f"{stats['subjects_with_rejected_reference']} subjects got a fallback reference" in out

    as_json = json.loads(CliRunner().invoke(main, ["data", "info", str(folder), "--json"]).output)
    assert as_json["scenes"] == stats["scenes_written"] and as_json["complete"]
    # the counts are read from each entry's verdict: one entry judged clean moves from fallback to clean
    pool = json.loads((folder / "pool.json").read_text())
    entry = next(e for entries in pool["categories"].values() for e in entries if e["clean"] is False)
    entry["clean"] = True
    pool_bytes = (folder / "pool.json").read_bytes()
    (folder / "pool.json").write_text(json.dumps(pool))
    as_json = json.loads(CliRunner().invoke(main, ["data", "info", str(folder), "--json"]).output)
    assert (as_json["pools"]["clean"], as_json["pools"]["fallback"]) == (rule["pool_clean"] + 1, fallback - 1)
    (folder / "pool.json").write_bytes(pool_bytes)

    # an interrupted build: a partial last line is ignored (and left alone), a missing layout is reported
    (folder / "stats.json").unlink()
    (folder / "manifest.jsonl").write_bytes(manifest + b'{"image_id": 1, "subj')
    layout = json.loads(manifest.splitlines()[0])["layout_map"]
    (folder / layout).unlink()
    result = CliRunner().invoke(main, ["data", "info", str(folder), "--check"])
    assert result.exit_code == 1
    assert "build not finished" in result.output and f"1 missing, e.g. {layout}" in result.output
    assert (folder / "manifest.jsonl").read_bytes().endswith(b'"subj')

    result = CliRunner().invoke(main, ["data", "info", str(tmp_path)])
    assert result.exit_code == 1 and "not an MSI dataset folder" in result.output and "build-msi" in result.output
