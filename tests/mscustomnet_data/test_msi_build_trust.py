"""The MSI build as a writer you can trust: one build per folder, config written only for valid inputs, COCO known by
content (a build resumes from a copy elsewhere), temp files of a killed build removed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mscustomnet.cli import main
from mscustomnet.data.build import BuildConfig, build_msi
from msibench import exitcodes
from msibench.records import LockBusyError, exclusive_or_busy


def tree_bytes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip
    }


def test_failed_first_build_writes_no_config_and_the_corrected_command_runs(tiny_coco, tiny_build, tmp_path):
    wrong = tmp_path / "not-coco"
    wrong.mkdir()
    out = tmp_path / "msi"
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        build_msi(BuildConfig(coco_root=wrong, split="train2017", out=out), progress=False)
    assert not (out / "config.json").exists()
    runner = CliRunner()
    args = ["data", "build-msi", "--split", "train2017", "--out", str(out), "--quiet"]
    res = runner.invoke(main, [*args, "--coco-root", str(wrong)])
    assert res.exit_code == exitcodes.ERROR and "annotation file not found" in res.output
    res = runner.invoke(main, [*args, "--coco-root", str(tiny_coco)])
    assert res.exit_code == exitcodes.FAILURES, res.output  # done; the tiny split's two damaged photos named
    assert tree_bytes(out) == tree_bytes(tiny_build)


def test_broken_captions_file_writes_no_config_and_the_repaired_coco_builds(tiny_coco, tmp_path):
    coco = shutil.copytree(tiny_coco, tmp_path / "coco")
    captions = coco / "annotations" / "captions_train2017.json"
    good = captions.read_bytes()
    captions.write_bytes(good[: len(good) // 2])  # a truncated download
    out = tmp_path / "msi"
    args = ["data", "build-msi", "--coco-root", str(coco), "--split", "train2017", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == exitcodes.ERROR and "captions_train2017.json: not valid JSON" in res.output
    assert not (out / "config.json").exists()
    captions.write_bytes(good)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == exitcodes.FAILURES, res.output  # done; the tiny split's two damaged photos named
    fresh = build_msi(BuildConfig(coco_root=coco, split="train2017", out=tmp_path / "fresh"), progress=False)
    assert tree_bytes(out) == tree_bytes(fresh.out)


def test_build_resumes_from_a_coco_copy_at_another_path(tiny_coco, tiny_build, tmp_path):
    out = tmp_path / "msi"
    shutil.copytree(tiny_build, out)
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    (out / "manifest.jsonl").write_bytes(lines[0])  # killed after the first scene
    (out / "stats.json").unlink()
    copy = shutil.copytree(tiny_coco, tmp_path / "elsewhere" / "coco")
    build_msi(BuildConfig(coco_root=copy, split="train2017", out=out), progress=False)
    assert tree_bytes(out, skip=("config.json",)) == tree_bytes(tiny_build, skip=("config.json",))
    config = json.loads((out / "config.json").read_text())
    assert config["coco_root"] == str(copy.resolve())  # where the Dataset finds the photos now
    assert "coco_root" not in json.loads((out / "stats.json").read_text())["config"]
    # a COCO with other annotations is another build
    changed = shutil.copytree(tiny_coco, tmp_path / "changed")
    ann = changed / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][1:]
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="instances_sha256"):
        build_msi(BuildConfig(coco_root=changed, split="train2017", out=out), progress=False)


def test_second_build_into_one_folder_is_refused(tiny_coco, tmp_path):
    out = tmp_path / "msi"
    out.mkdir()
    with exclusive_or_busy(out / ".build.lock", "the MSI build", "-"):
        with pytest.raises(LockBusyError, match=r"the MSI build in .* is being written by pid \d+"):
            build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=out), progress=False)
        res = CliRunner().invoke(
            main, ["data", "build-msi", "--coco-root", str(tiny_coco), "--out", str(out), "--quiet"]
        )
        assert res.exit_code == exitcodes.BUSY and "being written by" in res.output
    assert not (out / "manifest.jsonl").exists()


def test_stale_temp_files_of_a_killed_build_are_removed(tiny_coco, tiny_build, tmp_path):
    out = tmp_path / "msi"
    shutil.copytree(tiny_build, out)
    pool_file = next((out / "pool").rglob("*.png"))
    stale = [
        pool_file.with_name(f".{pool_file.name}.4242.tmp"),
        out / "layouts" / ".000000000001.png.4242.tmp",
        out / ".stats.json.4242.tmp",
    ]
    for path in stale:
        path.write_bytes(b"half")
    build_msi(BuildConfig(coco_root=tiny_coco, split="train2017", out=out), progress=False)
    assert not any(p.exists() for p in stale)
    assert tree_bytes(out) == tree_bytes(tiny_build)


def test_damaged_photos_are_named_and_a_resume_after_restoring_them_rebuilds_what_they_affect(tiny_coco, tmp_path):
    """A photo damaged at build time leaves the dataset different (exit 3, named); restored, the same command
    rebuilds what it affected, and the result equals a build over the intact COCO."""
    coco = shutil.copytree(tiny_coco, tmp_path / "coco")
    intact = build_msi(BuildConfig(coco_root=coco, split="train2017", out=tmp_path / "intact"), progress=False)
    pool = json.loads((intact.out / "pool.json").read_text())
    used = {e["image_id"] for entries in pool["categories"].values() for e in entries}
    photo = coco / "train2017" / f"{min(used):012d}.png"  # a photo a reference pool cuts from
    good = photo.read_bytes()
    photo.write_bytes(good[: len(good) // 3])  # truncated
    out = tmp_path / "msi"
    args = ["data", "build-msi", "--coco-root", str(coco), "--split", "train2017", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == exitcodes.FAILURES and photo.name in res.output
    assert (out / "pool.json").read_bytes() != (intact.out / "pool.json").read_bytes()
    photo.write_bytes(good)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == exitcodes.FAILURES and photo.name not in res.output  # the split's own damaged photos stay
    # every file equal, so no cut-out of a stand-in candidate stays behind in pool/
    assert tree_bytes(out, skip=("config.json",)) == tree_bytes(intact.out, skip=("config.json",))


def test_info_check_fails_on_a_torn_last_manifest_line_as_training_does(tiny_build, tmp_path):
    out = shutil.copytree(tiny_build, tmp_path / "msi")
    data = (out / "manifest.jsonl").read_bytes()
    (out / "manifest.jsonl").write_bytes(data + data[: len(data) // 4])  # a torn copy of a line
    res = CliRunner().invoke(main, ["data", "info", str(out)])
    assert res.exit_code == 0  # a plain summary still reads what is committed
    res = CliRunner().invoke(main, ["data", "info", str(out), "--check"])
    assert res.exit_code == exitcodes.ERROR and "last line is torn" in res.output and "build-msi" in res.output
    from mscustomnet.data.dataset import load_manifest

    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(out / "manifest.jsonl")
