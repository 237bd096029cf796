from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from msibench.bench.prepare import reference_paths
from msibench.methods.paste import PasteMethod
from msibench.records import read_records
from msibench.runner import RunConflictError, parse_shard, run_method, sample_seed

VOLATILE = ("seconds", "peak_memory_mb")


def _stable(records):
    return sorted(
        ({k: v for k, v in r.items() if k not in VOLATILE} for r in records),
        key=lambda r: (r["task_id"], r["sample_index"]),
    )


def _images(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "msibench", "run", "--method", "paste", "--manifest", "v1", "--no-progress", *args]


@pytest.fixture
def reference_run(tmp_path, prepared, coco_root):
    run_dir = tmp_path / "uninterrupted"
    summary = run_method(
        PasteMethod(resolution=64), run_dir=run_dir, manifest=prepared, seeds=2, coco_root=coco_root, progress=False
    )
    assert summary.ok == 400 and summary.failed == 0
    return run_dir


def test_seeds_depend_only_on_task_and_sample():
    assert sample_seed(0, "multi-k2-000", 1) == sample_seed(0, "multi-k2-000", 1)
    assert len({sample_seed(0, "multi-k2-000", i) for i in range(50)}) == 50
    assert sample_seed(0, "a", 0) != sample_seed(1, "a", 0)


def test_kill_and_resume_gives_the_uninterrupted_records(tmp_path, reference_run, coco_root):
    run_dir = tmp_path / "killed"
    cmd = _cli("-M", "resolution=64", "--seeds", "2", "--run-dir", str(run_dir), "--coco-root", str(coco_root))
    records = run_dir / "records.jsonl"
    for kill_after in (5, 150, 300):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            if records.exists() and records.read_bytes().count(b"\n") >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        # Every record written before the kill points at a complete image.
        for rec in read_records(run_dir):
            Image.open(run_dir / rec["image"]).verify()
    # No temp file of a killed write is ever mistaken for an image.
    finish = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    got = read_records(run_dir, latest_only=False)
    assert len(got) == 400  # each (task, sample) recorded exactly once
    assert _stable(got) == _stable(read_records(reference_run))
    assert _images(run_dir) == _images(reference_run)


def test_two_concurrent_shards_cover_every_task_once(tmp_path, reference_run, coco_root):
    run_dir = tmp_path / "sharded"
    base = ["-M", "resolution=64", "--seeds", "2", "--run-dir", str(run_dir), "--coco-root", str(coco_root)]
    procs = [
        subprocess.Popen(_cli(*base, "--shard", f"{i}/2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    got = read_records(run_dir, latest_only=False)
    assert len(got) == 400
    assert _stable(got) == _stable(read_records(reference_run))
    assert _images(run_dir) == _images(reference_run)


def test_resume_skips_done_and_limit_and_tracks_select(tmp_path, prepared, coco_root):
    run_dir = tmp_path / "r"
    first = run_method(
        PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, track="multi", limit=3, progress=False
    )
    assert first.ok == 3 and {r["task_id"] for r in read_records(run_dir)} == {  # stratified over K
        "multi-k2-000",
        "multi-k3-000",
        "multi-k4-000",
    }
    second = run_method(
        PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, track="all", limit=3, progress=False
    )
    assert second.done_before == 3 and second.ok == 3


def test_changed_fingerprint_is_refused(tmp_path, prepared):
    run_dir = tmp_path / "r"
    run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    with pytest.raises(RunConflictError, match="fingerprint_hash"):
        run_method(PasteMethod(resolution=48), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    with pytest.raises(RunConflictError, match="base_seed"):
        run_method(
            PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, base_seed=7, progress=False
        )
    assert len(read_records(run_dir)) == 2  # nothing lost by the refusals
    summary = run_method(
        PasteMethod(resolution=48), run_dir=run_dir, manifest=prepared, limit=1, overwrite=True, progress=False
    )
    assert summary.ok == 2
    assert {Image.open(run_dir / r["image"]).size for r in read_records(run_dir)} == {(48, 48)}
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["fingerprint"]["config"]["resolution"] == 48
    assert run_json["manifest"]["sha256"] == prepared.sha256
    assert run_json["packages"]["msibench"]


def test_default_run_folder_is_named_by_fingerprint(tmp_path, prepared):
    a = run_method(PasteMethod(resolution=32), out=tmp_path, manifest=prepared, limit=1, progress=False)
    b = run_method(PasteMethod(resolution=40), out=tmp_path, manifest=prepared, limit=1, progress=False)
    assert a.run_dir != b.run_dir and a.run_dir.name.startswith("paste-")


def test_unreadable_reference_is_recorded_as_failure(tmp_path, prepared, coco_root, monkeypatch):
    """A reference that turns unreadable after the cache check (the check itself repairs damage: see test_trust)
    fails its sample only; the failure is kept on resume and --retry-failed heals it."""
    from msibench import exitcodes, runner

    tasks = prepared.select("multi", limit=4)
    victim = tasks[1].subjects[0]
    path = reference_paths(victim.reference, prepared.sources[victim.reference.image_id]).image
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    check = runner.missing_references
    monkeypatch.setattr(runner, "missing_references", lambda *args, **kwargs: [])
    summary = run_method(
        PasteMethod(resolution=32), run_dir=tmp_path / "r", manifest=prepared, track="multi", limit=4, progress=False
    )
    assert (summary.ok, summary.failed, summary.exit_code) == (3, 1, exitcodes.FAILURES)
    failed = [r for r in read_records(tmp_path / "r") if r["status"] == "failed"]
    assert [r["task_id"] for r in failed] == [tasks[1].id]
    assert "reference" in failed[0]["reason"] and path.name in failed[0]["reason"]
    # Failed samples are kept on resume unless retried (and the exit code still says they are there).
    again = run_method(
        PasteMethod(resolution=32), run_dir=tmp_path / "r", manifest=prepared, track="multi", limit=4, progress=False
    )
    assert (again.failed, again.failed_recorded, again.exit_code) == (0, 1, exitcodes.FAILURES)
    monkeypatch.setattr(runner, "missing_references", check)  # it finds the damaged reference, cuts it out again
    retry = run_method(
        PasteMethod(resolution=32),
        run_dir=tmp_path / "r",
        manifest=prepared,
        track="multi",
        limit=4,
        retry_failed=True,
        coco_root=coco_root,
        progress=False,
    )
    assert retry.ok == 1 and retry.exit_code == exitcodes.OK
    assert all(r["status"] == "ok" for r in read_records(tmp_path / "r"))


class _Flaky(PasteMethod):
    """Paste that raises for one task: the batch is retried one by one and only that sample fails."""

    def generate(self, requests):
        if any(r.task.id == "multi-k3-001" for r in requests):
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().generate(requests)


def test_method_exception_fails_one_sample_and_run_goes_on(tmp_path, prepared):
    summary = run_method(
        _Flaky(resolution=32), run_dir=tmp_path / "r", manifest=prepared, track="multi", limit=6, progress=False
    )
    assert (summary.ok, summary.failed) == (5, 1)
    rec = {r["task_id"]: r for r in read_records(tmp_path / "r")}
    assert rec["multi-k3-001"]["status"] == "failed" and "out of memory" in rec["multi-k3-001"]["reason"]


class _TwoSubjects(PasteMethod):
    @property
    def capabilities(self):
        from msibench.methods.base import Capabilities

        return Capabilities(max_subjects=2, uses_layout=True, uses_zorder=False)


def test_tasks_beyond_capabilities_are_skipped_with_reason(tmp_path, prepared):
    summary = run_method(
        _TwoSubjects(resolution=32), run_dir=tmp_path / "r", manifest=prepared, track="multi", progress=False
    )
    assert summary.ok == 25 and summary.skipped == 75
    skipped = [r for r in read_records(tmp_path / "r") if r["status"] == "skipped"]
    assert all("at most 2 subject" in r["reason"] for r in skipped)


def test_cli_exit_code_counts_failures_and_refusal_message(tmp_path, prepared, coco_root):
    run_dir = tmp_path / "r"
    ok = subprocess.run(
        _cli("-M", "resolution=32", "--limit", "2", "--run-dir", str(run_dir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(
        _cli("-M", "resolution=40", "--limit", "2", "--run-dir", str(run_dir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "refusing to mix" in refused.stderr and "--overwrite" in refused.stderr
    bad = subprocess.run(_cli("-M", "resolutoin=40"), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown option 'resolutoin'" in bad.stderr  # an invalid option value: usage


def test_shard_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (3, 4)
    assert parse_shard("1/2") == (1, 2)
    with pytest.raises(ValueError, match="I/N"):
        parse_shard("half")
    monkeypatch.setenv("LOCAL_RANK", "1")
    from msibench import runner

    monkeypatch.setattr(runner, "_cuda_device_count", lambda: 2)  # this machine has no GPU: pretend two
    assert runner.resolve_device("cuda") == "cuda:1"
    assert runner.resolve_device(None) == "cuda:1"
    assert runner.resolve_device("cpu") == "cpu"


def test_runner_prepares_missing_references_itself(tmp_path, coco_root, manifest):
    summary = run_method(
        PasteMethod(resolution=32),
        run_dir=tmp_path / "r",
        manifest=manifest,
        track="single",
        limit=3,
        coco_root=coco_root,
        progress=False,
    )
    assert summary.ok == 3
    assert os.listdir(Path(os.environ["MSIBENCH_CACHE"]) / "references")


class _NoWeights(PasteMethod):
    def setup(self, device):
        from msibench.methods.base import WeightsUnavailableError

        raise WeightsUnavailableError("weights 'org/model' not found; pass -M weights=DIR")


def test_setup_failure_is_reported_and_loses_nothing(tmp_path, prepared):
    from msibench.runner import MethodSetupError

    run_dir = tmp_path / "r"
    run_method(PasteMethod(resolution=32), run_dir=run_dir, manifest=prepared, limit=1, progress=False)
    before = (run_dir / "records.jsonl").read_bytes()
    with pytest.raises(MethodSetupError, match=r"paste: setup on cpu failed: WeightsUnavailableError: .*-M weights"):
        run_method(_NoWeights(resolution=32), run_dir=run_dir, manifest=prepared, limit=2, progress=False)
    assert (run_dir / "records.jsonl").read_bytes() == before


def test_run_json_records_the_manifest_by_name_and_scoring_finds_it(tmp_path, prepared):
    from msibench.scoring.score import resolve_run_manifest

    run_method(PasteMethod(resolution=32), run_dir=tmp_path / "r", manifest=prepared, limit=1, progress=False)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["manifest"]["name"] == "v1" and info["manifest"]["sha256"] == prepared.sha256
    # Moved installation: the recorded path is gone, the recorded name still finds the packaged v1 (not the default).
    info["manifest"]["path"] = str(tmp_path / "gone" / "msibench_v1.json")
    assert resolve_run_manifest(tmp_path / "r", info, None).sha256 == prepared.sha256
    assert resolve_run_manifest(tmp_path / "r", info, "v1").name == "v1"
