"""Results you can trust (generation side): damage heals itself on resume, concurrent writers are kept apart, bad
options and environment values are refused up front with a message naming them, exit codes have one meaning each,
and files get the umask's permissions."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from msibench import exitcodes
from msibench.bench.manifest import ManifestError, dumps, load_manifest
from msibench.bench.prepare import prepare, reference_paths
from msibench.cache import atomic_write_bytes
from msibench.cli import main
from msibench.methods.paste import PasteMethod
from msibench.records import LockBusyError, RecordLog, exclusive_or_busy, read_records
from msibench.runner import OptionError, run_method


def _invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def _paste(run_dir: Path, *extra: str, env: dict[str, str] | None = None):
    """`msibench run --method paste` on v1 (the manifest the `prepared` cache holds)."""
    args = ["run", "--method", "paste", "--manifest", "v1", "--no-progress", "--run-dir", str(run_dir), *extra]
    return _invoke(*args, env=env)


# ------------------------------------------------------------------------------------------- 4: images heal


def test_resume_regenerates_deleted_and_altered_images(tmp_path, prepared):
    run_dir = tmp_path / "r"
    first = run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=2, progress=False)
    assert first.ok == 4
    records = {r["task_id"]: r for r in read_records(run_dir)}
    originals = {name: (run_dir / r["image"]).read_bytes() for name, r in records.items()}
    for r in records.values():  # the record carries the sha256 of the bytes written
        assert r["image_sha256"] == hashlib.sha256(originals[r["task_id"]]).hexdigest()
    deleted, altered = sorted(records)[:2]
    (run_dir / records[deleted]["image"]).unlink()
    (run_dir / records[altered]["image"]).write_bytes(b"garbage")
    again = run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=2, progress=False)
    assert (again.repaired, again.ok, again.done_before) == (2, 2, 2)
    assert {name: (run_dir / r["image"]).read_bytes() for name, r in records.items()} == originals
    third = run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=2, progress=False)
    assert (third.repaired, third.ok, third.done_before) == (0, 0, 4)


def test_cli_says_how_many_images_were_regenerated(tmp_path, prepared):
    run_dir = tmp_path / "r"
    assert _paste(run_dir, "-M", "resolution=32", "--limit", "1").exit_code == 0
    (run_dir / read_records(run_dir)[0]["image"]).unlink()
    res = _paste(run_dir, "-M", "resolution=32", "--limit", "1")
    assert res.exit_code == 0, res.output
    assert "1 recorded images were missing or changed: generated again" in res.output


# ------------------------------------------------------------------------------------ 5: references heal


def _victim(manifest):
    task = manifest.select("multi", limit=1)[0]
    subject = task.subjects[0]
    return task, reference_paths(subject.reference, manifest.sources[subject.reference.image_id])


def test_damaged_cached_reference_is_rebuilt_from_coco(tmp_path, prepared, coco_root):
    task, paths = _victim(prepared)
    good = paths.image.read_bytes()
    paths.image.write_bytes(good[: len(good) // 2])  # truncated: exists, but not what was written
    summary = run_method(
        PasteMethod(resolution=32),
        run_dir=tmp_path / "r",
        manifest=prepared,
        track="multi",
        limit=1,
        coco_root=coco_root,
        progress=False,
    )
    assert (summary.ok, summary.failed) == (1, 0)
    assert paths.image.read_bytes() == good


def test_data_prepare_reports_and_rebuilds_a_damaged_reference(prepared, coco_root):
    _, paths = _victim(prepared)
    good = paths.mask.read_bytes()
    img = Image.new("L", Image.open(paths.mask).size, 0)  # a valid PNG, but other pixels than recorded
    img.save(paths.mask)
    res = _invoke("data", "prepare", "--manifest", "v1", "--coco-root", str(coco_root))
    assert res.exit_code == 0, res.output
    assert "1 references written (1 of them found damaged and rebuilt from COCO)" in res.output
    assert paths.mask.read_bytes() == good


# -------------------------------------------------------------------------------------------- 6: exit codes


class _FailsOne(PasteMethod):
    def generate(self, requests):
        if any(r.task.id == "multi-k3-000" for r in requests):
            raise RuntimeError("simulated failure")
        return super().generate(requests)


def test_exit_code_reports_recorded_failures_whatever_this_invocation_did(tmp_path, prepared):
    run_dir = tmp_path / "r"
    first = run_method(_FailsOne(resolution=32), run_dir=run_dir, manifest=prepared, track="multi", limit=2)
    assert (first.failed, first.exit_code) == (1, exitcodes.FAILURES)
    again = run_method(_FailsOne(resolution=32), run_dir=run_dir, manifest=prepared, track="multi", limit=2)
    assert (again.failed, again.done_before, again.exit_code) == (0, 2, exitcodes.FAILURES)
    healed = run_method(
        PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, track="multi", limit=2, retry_failed=True
    )
    assert (healed.ok, healed.exit_code) == (1, exitcodes.OK)


def test_exit_codes_are_distinct(tmp_path, prepared):
    run_dir = tmp_path / "r"
    assert _paste(run_dir, "-M", "resolution=32", "--limit", "1").exit_code == exitcodes.OK
    conflict = _paste(run_dir, "-M", "resolution=40", "--limit", "1")
    assert conflict.exit_code == exitcodes.ERROR and "refusing to mix" in conflict.output
    usage = _paste(run_dir, "--limit", "0")
    assert usage.exit_code == exitcodes.USAGE and "--limit" in usage.output
    with exclusive_or_busy(run_dir / ".shard-0-of-1.lock", "test", "-"):
        busy = _paste(run_dir, "-M", "resolution=32", "--limit", "1")
    assert busy.exit_code == exitcodes.BUSY and "pid" in busy.output
    assert len({exitcodes.OK, exitcodes.ERROR, exitcodes.USAGE, exitcodes.FAILURES, exitcodes.BUSY}) == 5


# -------------------------------------------------------------------------------------- 7: concurrent writers


def test_second_writer_of_a_shard_is_refused_and_loses_nothing(tmp_path, prepared):
    run_dir = tmp_path / "r"
    run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    before = (run_dir / "records.jsonl").read_bytes()
    with exclusive_or_busy(run_dir / ".shard-0-of-1.lock", "shard 0/1", "-"):
        with pytest.raises(LockBusyError, match=r"shard 0/1 of .* is being written by pid \d+"):
            run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=3, progress=False)
        # another shard may run beside it
        other = run_method(
            PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, shard=(0, 2), progress=False
        )
        assert other.total >= 0
    assert (run_dir / "records.jsonl").read_bytes().startswith(before)


def test_two_identical_commands_at_once_record_each_unit_once(tmp_path, prepared):
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "msibench", "run", "--method", "paste", "--manifest", "v1", "--no-progress"]
    cmd += ["-M", "resolution=64"]
    cmd += ["--seeds", "2", "--run-dir", str(run_dir)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    codes = []
    for p in procs:
        p.communicate(timeout=300)
        codes.append(p.returncode)
    # Either the second found the shard busy (4), or it started after the first ended and found all done (0).
    assert sorted(codes) in ([0, exitcodes.BUSY], [0, 0]), codes
    lines = (run_dir / "records.jsonl").read_bytes().count(b"\n")
    assert lines == 400


def test_overlapping_writers_never_record_a_unit_twice(tmp_path):
    path = tmp_path / "records.jsonl"
    a, b = RecordLog(path), RecordLog(path)
    a.read(), b.read()
    rec = {"task_id": "t", "sample_index": 0, "status": "ok"}
    assert a.append(rec) is True
    assert b.append(rec) is False  # recorded by the other writer since b's snapshot
    assert b.append({**rec, "sample_index": 1}) is True
    assert a.append(rec) is True  # a's own unit again (e.g. --retry-failed): allowed
    assert len(read_records(path, latest_only=False)) == 3


# ---------------------------------------------------------------------------------- 1: --overwrite leaves none


def test_overwrite_removes_every_result_of_the_old_run(tmp_path, prepared):
    run_dir = tmp_path / "r"
    run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    for name in ("scores.json", "scores.jsonl", "scores-abc.json", "scores-abc.jsonl"):
        (run_dir / name).write_text("{}\n")
    run_method(PasteMethod(resolution=48), run_dir=run_dir, manifest=prepared, limit=1, overwrite=True, progress=False)
    assert not list(run_dir.glob("scores*"))
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".discarded")]
    assert {Image.open(run_dir / r["image"]).size for r in read_records(run_dir)} == {(48, 48)}


def test_results_without_run_json_are_not_adopted(tmp_path, prepared):
    run_dir = tmp_path / "r"
    run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    (run_dir / "run.json").unlink()
    with pytest.raises(Exception, match="without a run.json"):
        run_method(PasteMethod(resolution=48), run_dir=run_dir, manifest=prepared, limit=1, progress=False)


# ------------------------------------------------------------------------------------------ 9: temp files


def test_stale_temp_files_are_removed_at_start(tmp_path, prepared, coco_root):
    run_dir = tmp_path / "r"
    run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    stale = [run_dir / "images" / ".multi-k2-000_s0.png.abc123.tmp", run_dir / ".run.json.xyz.tmp"]
    refs = Path(os.environ["MSIBENCH_CACHE"]) / "references"
    stale.append(refs / ".123-0123456789abcdef.png.q1w2e3.tmp")
    for path in stale:
        path.write_bytes(b"half a file")
    run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    assert [p.exists() for p in stale[:2]] == [False, False]
    prepare(prepared, coco_root, tasks=prepared.select("single", limit=1), verify_all=False)
    assert not stale[2].exists()


# ------------------------------------------------------------------------- 3 and 11: options and environment


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--limit", "-1"], {}, "--limit"),
        (["--limit", "0"], {}, "--limit"),
        (["--seeds", "0"], {}, "--seeds"),
        (["--seed", "-3"], {}, "--seed"),
        (["--shard", "2/2"], {}, "--shard"),
        (["--device", "tpu"], {}, "--device"),
        (["--device", "cuda"], {}, "no CUDA device"),
        ([], {"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2, WORLD_SIZE=2"),
        ([], {"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        ([], {"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
        ([], {"RANK": "0"}, "WORLD_SIZE"),
        ([], {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
        ([], {"MSIBENCH_CACHE": "/dev/null/cache"}, "MSIBENCH_CACHE=/dev/null/cache"),
    ],
)
def test_bad_options_and_environment_are_usage_errors_naming_them(tmp_path, args, env, names, monkeypatch):
    from msibench import runner

    monkeypatch.setattr(runner, "_cuda_device_count", lambda: 0)  # a CPU-only machine, whatever runs the test
    base = {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None}
    res = _paste(tmp_path / "r", *args, env={**base, **env})
    assert res.exit_code == exitcodes.USAGE, res.output
    assert names in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_run_method_validates_its_arguments(tmp_path, manifest):
    for kwargs, name in (({"limit": 0}, "--limit"), ({"seeds": 0}, "--seeds"), ({"shard": (2, 2)}, "--shard")):
        with pytest.raises(OptionError, match=name):
            run_method(PasteMethod(resolution=32), run_dir=tmp_path / "r", manifest=manifest, **kwargs)
    with pytest.raises(OptionError, match="tpu"):
        run_method(PasteMethod(resolution=32), run_dir=tmp_path / "r", manifest=manifest, device="tpu")


def test_run_json_records_the_device_of_this_machine(tmp_path, prepared):
    assert _paste(tmp_path / "r", "-M", "resolution=32", "--limit", "1").exit_code == 0
    expected = "cuda:0" if __import__("torch").cuda.is_available() else "cpu"
    assert json.loads((tmp_path / "r" / "run.json").read_text())["device"] == expected


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("background=[1,2]", "expected 3 values"),
        ("background=[1,2,256]", "outside the allowed range"),
        ("resolution=1000000", "outside the allowed range"),
        ("resolution=2.5", "cannot read '2.5' as int"),
    ],
)
def test_method_options_are_validated_at_construction(tmp_path, option, message):
    res = _paste(tmp_path / "r", "-M", option)
    assert res.exit_code == exitcodes.USAGE and message in res.output and "paste option" in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--method", "nosuch"],
        ["run", "--method", "paste", "-M", "resolution=abc"],
        ["run", "--method", "paste", "-M", "nokey=1"],
        ["score", ".", "--metrics", "bogus"],
    ],
)
def test_invalid_option_values_are_usage_errors(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == exitcodes.USAGE, res.output
    # click names the option; an unknown --method is named with the methods there are
    assert "Invalid value for" in res.output or "unknown method 'nosuch'" in res.output


def test_common_bounds_apply_to_every_method():
    from msibench.methods.base import coerce_options

    with pytest.raises(ValueError, match="'steps': 0 is outside"):
        coerce_options({"steps": 50}, {"steps": "0"}, "any-method")
    with pytest.raises(ValueError, match="'guidance': expected a finite number"):
        coerce_options({"guidance": 7.5}, {"guidance": "nan"}, "any-method")


def _manifest_with(tmp_path, edit) -> Path:
    raw = json.loads(Path(load_manifest().path).read_text())
    edit(raw)
    path = tmp_path / "m.json"
    path.write_bytes(dumps(raw))
    return path


def test_manifest_rejects_unknown_categories_and_empty_task_lists(tmp_path):
    def name(raw):
        raw["tasks"][0]["subjects"][0]["category"] = "unicorn"

    def cid(raw):
        raw["tasks"][0]["subjects"][0]["category_id"] = 9999

    def mismatch(raw):
        subject = raw["tasks"][0]["subjects"][0]
        subject["category_id"] = 1 if subject["category"] != "person" else 2

    with pytest.raises(ManifestError, match=r"subjects\[0\]\.category'.*'unicorn' is not a COCO-80 category"):
        load_manifest(_manifest_with(tmp_path, name))
    with pytest.raises(ManifestError, match=r"subjects\[0\]\.category_id'.*9999 is not a COCO-80 category id"):
        load_manifest(_manifest_with(tmp_path, cid))
    with pytest.raises(ManifestError, match=r"category_id'.*not"):
        load_manifest(_manifest_with(tmp_path, mismatch))
    with pytest.raises(ManifestError, match=r"'tasks': empty"):
        load_manifest(_manifest_with(tmp_path, lambda raw: raw.update(tasks=[])))


# ------------------------------------------------------------------------------------------ --limit stratified


def test_limit_is_a_sample_stratified_over_k(manifest):
    assert [t.k for t in manifest.select("multi", limit=4)] == [2, 3, 4, 5]
    assert sorted(t.k for t in manifest.select("multi", limit=6)) == [2, 2, 3, 3, 4, 5]
    assert [t.id for t in manifest.select("multi", limit=5)][:2] == ["multi-k2-000", "multi-k2-001"]
    assert len(manifest.select("single", limit=7)) == 7
    assert manifest.select("all", limit=500) == list(manifest.tasks)
    with pytest.raises(ValueError, match="limit"):
        manifest.select("multi", limit=0)


# ------------------------------------------------------------------------------------------------ 12: umask


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_respect_the_umask(tmp_path, prepared, umask_022):
    run_dir = tmp_path / "r"
    run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    rec = read_records(run_dir)[0]
    assert _mode(run_dir / "run.json") == 0o644
    assert _mode(run_dir / rec["image"]) == 0o644
    assert _mode(run_dir / "images") == 0o755
    os.umask(0o027)
    atomic_write_bytes(tmp_path / "x" / "f.bin", b"1")
    assert _mode(tmp_path / "x" / "f.bin") == 0o640


def test_references_respect_the_umask(coco_root, manifest, umask_022):
    prepare(manifest, coco_root, tasks=manifest.select("single", limit=1), verify_all=False)
    files = list((Path(os.environ["MSIBENCH_CACHE"]) / "references").glob("*.png"))
    assert files and {_mode(p) for p in files} == {0o644}


def test_model_and_checkpoint_writers_respect_the_umask(tmp_path, umask_022):
    torch = pytest.importorskip("torch")
    from mscustomnet.model.config import ModelConfig
    from mscustomnet.model.io import save_state
    from mscustomnet.train.checkpoint import save_checkpoint

    folder = save_state(tmp_path / "model", ModelConfig(), {"w": torch.zeros(2)})
    assert {_mode(folder / name) for name in ("model.safetensors", "config.json")} == {0o644}
    final = save_checkpoint(tmp_path / "run", 1, {"step": 1}, keep=2)
    assert _mode(final) == 0o755 and _mode(final.parent / "latest") == 0o644


def test_downloaded_weights_respect_the_umask(tmp_path, umask_022, monkeypatch):
    import io
    import urllib.request

    from msibench import weights

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"weights"))
    dest = tmp_path / "weights" / "yolo11x-seg.pt"
    weights._download_url("https://example.invalid/yolo11x-seg.pt", dest)
    assert dest.read_bytes() == b"weights" and _mode(dest) == 0o644


# -------------------------------------------------------------------------------------------- a full disk


def test_full_disk_keeps_what_was_committed_and_the_same_command_resumes(tmp_path, prepared, monkeypatch):
    import errno

    from msibench import cache, runner

    writes = []
    real = cache.atomic_write_bytes

    def fills_up(path, data):
        writes.append(path)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(runner, "atomic_write_bytes", fills_up)
    run_dir = tmp_path / "r"
    res = _paste(run_dir, "-M", "resolution=32", "--limit", "2")
    assert res.exit_code == exitcodes.ERROR and "No space left on device" in res.output
    assert "run the same command again" in res.output
    assert len(read_records(run_dir)) == 1 and not list(run_dir.rglob(".*.tmp"))
    monkeypatch.setattr(runner, "atomic_write_bytes", real)  # space again
    again = _paste(run_dir, "-M", "resolution=32", "--limit", "2")
    assert again.exit_code == 0 and "3 generated" in again.output, again.output
    assert len(read_records(run_dir, latest_only=False)) == 4


# ----------------------------------------------------------------------------------- torchrun: wait for peers


def test_rank_with_failures_waits_for_the_other_ranks(tmp_path, prepared):
    """torchrun stops every rank when one exits non-zero: a rank that will exit 3 first waits until the other
    writers of the folder have left (here a peer that itself waits to be alone, as a second failing rank would)."""
    import threading

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    release = tmp_path / "release"
    peer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, sys, time\n"
            "from msibench.records import FolderWriters\n"
            f"w = FolderWriters({str(run_dir)!r}); w.enter(); w.share()\n"
            "print('in', flush=True)\n"
            f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.01)\n"
            "w.wait_alone(); w.close()\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert peer.stdout.readline().strip() == "in"
    result = {}

    def rank():
        result["summary"] = run_method(
            _FailsOne(resolution=32),
            run_dir=run_dir,
            manifest=prepared,
            track="multi",
            limit=2,
            progress=False,
            wait_for_peers=True,
        )

    thread = threading.Thread(target=rank)
    thread.start()
    while not any(r["status"] == "failed" for r in read_records(run_dir)):
        thread.join(0.01)
    thread.join(0.5)
    assert thread.is_alive()  # done generating, but the peer is still in the folder
    release.touch()
    thread.join(60)
    assert not thread.is_alive() and result["summary"].exit_code == exitcodes.FAILURES
    assert peer.wait(60) == 0


def test_a_damaged_run_json_is_repaired_keeping_images_and_records(tmp_path, prepared):
    run_dir = tmp_path / "run"
    assert _paste(run_dir, "--limit", "1", "-M", "resolution=32").exit_code == 0
    images = {p.name: p.read_bytes() for p in (run_dir / "images").iterdir()}
    records = (run_dir / "records.jsonl").read_bytes()
    (run_dir / "run.json").write_text('{"method": "paste", "fingerp')  # torn
    res = _paste(run_dir, "--limit", "1", "-M", "resolution=32")
    assert res.exit_code == exitcodes.ERROR and "--repair" in res.output
    # another configuration cannot claim the records
    res = _paste(run_dir, "--limit", "1", "-M", "resolution=48", "--repair")
    assert res.exit_code == exitcodes.ERROR and "cannot rewrite run.json" in res.output
    res = _paste(run_dir, "--limit", "1", "-M", "resolution=32", "--repair")
    assert res.exit_code == 0, res.output
    assert "0 generated" in res.output and "already done" in res.output
    assert json.loads((run_dir / "run.json").read_text())["method"] == "paste"
    assert {p.name: p.read_bytes() for p in (run_dir / "images").iterdir()} == images
    assert (run_dir / "records.jsonl").read_bytes() == records
