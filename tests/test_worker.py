"""A method in a worker process (msibench.methods.worker, docs/environments.md): the paste method served by a
second Python process gives the in-process paste method's images through the runner; a dead worker is named and
restarted."""

from __future__ import annotations

import sys

import pytest

from msibench.methods.base import Capabilities
from msibench.methods.paste import PasteMethod
from msibench.methods.worker import WorkerError, WorkerMethod
from msibench.records import read_records
from msibench.runner import run_method


class PasteInWorker(WorkerMethod):
    name = "paste-worker"
    target = "paste"
    environment = "paste-test"
    declared_capabilities = PasteMethod().capabilities


def _images(run_dir):
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def test_worker_gives_the_in_process_images_through_the_runner(tmp_path, coco_root):
    inside = run_method(PasteMethod(resolution=64), run_dir=tmp_path / "in", track="all", limit=2,
                        coco_root=coco_root, progress=False)  # fmt: skip
    worker = PasteInWorker(python=sys.executable, resolution=64)
    outside = run_method(worker, run_dir=tmp_path / "out", track="all", limit=2, coco_root=coco_root, progress=False)
    worker.close()
    assert (inside.ok, outside.ok, outside.failed) == (4, 4, 0), outside.failures
    assert _images(tmp_path / "in") == _images(tmp_path / "out")
    config = worker.config()
    assert config["config"] == PasteMethod(resolution=64).config() and config["versions"]["python"]
    assert {r["status"] for r in read_records(tmp_path / "out")} == {"ok"}


def _request(seed: int):
    from PIL import Image

    from msibench.bench.manifest import load_manifest
    from msibench.methods.base import GenerationRequest, SubjectInput

    task = load_manifest().select("single", limit=1)[0]
    s = task.subjects[0]
    reference = Image.new("RGB", (20, 30), (200, 40, 40))
    subject = SubjectInput(s.category, s.category_id, s.box, s.z, reference, Image.new("L", (20, 30), 255))
    return GenerationRequest(task, 0, seed, (subject,))


class DyingWorker(PasteInWorker):
    target = "worker_targets:PasteDyingOnSeed13"


def test_a_worker_dying_mid_request_is_named_and_the_next_request_restarts_it(monkeypatch, caplog):
    from pathlib import Path

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # worker_targets.py, beside this file
    worker = DyingWorker(python=sys.executable, resolution=32)
    worker.setup("cpu")
    before = worker.generate([_request(7)])[0]
    with pytest.raises(WorkerError, match=r"(?s)the worker exited \(code 3\).*dying on purpose: seed 13"):
        worker.generate([_request(13)])
    after = worker.generate([_request(7)])[0]  # a fresh worker, set up again
    assert "(re)starting its worker" in caplog.text
    assert list(before.getdata()) == list(after.getdata())
    # Killed between requests: restarted on the next one, nothing lost.
    worker._proc.kill()
    worker._proc.wait()
    assert list(worker.generate([_request(7)])[0].getdata()) == list(before.getdata())
    worker.close()


def test_a_failing_setup_and_a_bad_option_are_reported():
    with pytest.raises(WorkerError, match="could not describe paste.*unknown option 'colour'"):
        PasteInWorker(python=sys.executable, colour="red").config()


def test_a_missing_interpreter_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("MSIBENCH_ENV_PASTE_TEST", raising=False)
    with pytest.raises(ValueError, match="MSIBENCH_ENV_PASTE_TEST.*envs/paste-test/bin/python"):
        PasteInWorker()
    monkeypatch.setenv("MSIBENCH_ENV_PASTE_TEST", sys.executable)
    assert PasteInWorker().python == str(__import__("pathlib").Path(sys.executable).absolute())


def test_capabilities_are_declared_without_starting_a_worker():
    worker = PasteInWorker(python=sys.executable)
    assert worker.capabilities == Capabilities(max_subjects=PasteMethod().capabilities.max_subjects,
                                               uses_layout=True, uses_zorder=True)  # fmt: skip
    assert worker._proc is None
